//! Models by Hugging Face Hub id: `ORG/NAME[/SUBFOLDER][@REVISION]` resolved to a local
//! directory through the cache huggingface_hub writes (`models--ORG--NAME/refs/<revision>`,
//! `snapshots/<commit>/…` linking to `blobs/`), so that weights Python already downloaded
//! are found where they are, and what is missing is downloaded there by `hf-hub`.
//!
//! The environment is read as huggingface_hub reads it: the cache is `HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`; the token `HF_TOKEN`, else the file
//! `HF_HOME/token`; `HF_HUB_OFFLINE=1` uses the cache only; `HF_ENDPOINT` replaces
//! `https://huggingface.co`. An existing local path always wins, as in diffusers. Only the
//! files the command reads are fetched: the config, the weights (one file, or the shards
//! an index names), a pipeline's components and tokenizer files.

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What a command reads from a model location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// A transformer directory (`config.json` and its weights); a pipeline given instead
    /// resolves to its `transformer/`.
    Transformer,
    /// A pipeline (`model_index.json` and the components it has) if the location holds
    /// one, else a transformer directory.
    PipelineOrTransformer,
    /// A LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`).
    Adapter,
}

/// A Hub location: repository, folder inside it, revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubLocation {
    /// `ORG/NAME`.
    pub repo: String,
    /// A folder inside the repository (`transformer`), empty for its root.
    pub subfolder: String,
    /// A branch, tag or commit (`main` by default).
    pub revision: String,
}

impl HubLocation {
    /// Parses `ORG/NAME[/SUBFOLDER…][@REVISION]`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (path, revision) = match text.rsplit_once('@') {
            Some((path, revision)) if !revision.is_empty() => (path, revision),
            Some(_) => return None,
            None => (text, "main"),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let valid = |p: &&str| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() < 2 || !parts.iter().all(valid) {
            return None;
        }
        Some(Self {
            repo: format!("{}/{}", parts[0], parts[1]),
            subfolder: parts[2..].join("/"),
            revision: revision.to_string(),
        })
    }

    /// `ORG/NAME[/SUBFOLDER]@REVISION`, for messages.
    fn describe(&self) -> String {
        let folder = if self.subfolder.is_empty() {
            String::new()
        } else {
            format!("/{}", self.subfolder)
        };
        format!("{}{folder}@{}", self.repo, self.revision)
    }

    /// `SUBFOLDER/name`, or `name` at the root.
    fn file(&self, name: &str) -> String {
        if self.subfolder.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.subfolder)
        }
    }
}

/// The local directory for a `--model`/`--lora` argument: the path itself when it exists,
/// else the Hub location it names, resolved in the cache (and downloaded into it unless
/// offline).
pub fn resolve(argument: &Path, needs: Needs) -> Result<PathBuf> {
    if argument.exists() {
        return Ok(argument.to_path_buf());
    }
    let text = argument.to_string_lossy();
    let Some(location) = HubLocation::parse(&text) else {
        bail!(
            "{text}: no such file or directory, and not a Hugging Face Hub id \
             (ORG/NAME[/SUBFOLDER][@REVISION])"
        );
    };
    let hub = Hub::open(&location)?;
    hub.fetch_for(&location, needs)
}

/// The cache's root directory, as huggingface_hub finds it.
pub fn cache_dir() -> PathBuf {
    match env_path("HF_HUB_CACHE") {
        Some(dir) => dir,
        None => hf_home().join("hub"),
    }
}

fn hf_home() -> PathBuf {
    if let Some(home) = env_path("HF_HOME") {
        return home;
    }
    let base = env_path("XDG_CACHE_HOME")
        .or_else(|| env_path("HOME").map(|home| home.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("huggingface")
}

/// The path an environment variable holds, unless it is unset or empty.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn token() -> Option<String> {
    if let Ok(token) = std::env::var("HF_TOKEN") {
        if !token.trim().is_empty() {
            return Some(token.trim().to_string());
        }
    }
    let token = std::fs::read_to_string(hf_home().join("token")).ok()?;
    Some(token.trim().to_string()).filter(|t| !t.is_empty())
}

/// One repository at one revision: its file list, and how to get a file.
struct Hub {
    location: String,
    /// Files of the revision (from the Hub, or the cached snapshot when offline).
    files: BTreeSet<String>,
    source: Source,
}

enum Source {
    /// The cached snapshot of a commit only (offline, or the Hub unreachable: why).
    Cache { snapshot: PathBuf, why: String },
    /// The Hub, through the cache.
    Online(Box<ApiRepo>),
}

impl Hub {
    fn open(location: &HubLocation) -> Result<Self> {
        let cache = cache_dir();
        let repo = Repo::with_revision(
            location.repo.clone(),
            RepoType::Model,
            location.revision.clone(),
        );
        let describe = location.describe();
        let cached = || -> Result<(PathBuf, BTreeSet<String>)> {
            let snapshot =
                cached_snapshot(&cache, &repo, &location.revision).with_context(|| {
                    format!(
                        "{describe}: the revision `{}` of {} is not in the Hugging Face cache {}",
                        location.revision,
                        location.repo,
                        cache.display()
                    )
                })?;
            let files = list_files(&snapshot);
            Ok((snapshot, files))
        };
        if offline() {
            let (snapshot, files) =
                cached().context("HF_HUB_OFFLINE is set: nothing is downloaded")?;
            return Ok(Self {
                location: describe,
                files,
                source: Source::Cache {
                    snapshot,
                    why: "HF_HUB_OFFLINE is set".into(),
                },
            });
        }
        let mut builder = ApiBuilder::new()
            .with_cache_dir(cache.clone())
            .with_token(token())
            .with_progress(true);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        let api = builder
            .build()
            .context("cannot set up the Hugging Face Hub client")?;
        let api_repo = api.repo(repo.clone());
        match api_repo.info() {
            Ok(info) => Ok(Self {
                location: describe,
                files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
                source: Source::Online(Box::new(api_repo)),
            }),
            Err(error) => {
                let why = format!("the Hub did not answer ({error})");
                let (snapshot, files) = cached().with_context(|| why.clone())?;
                Ok(Self {
                    location: describe,
                    files,
                    source: Source::Cache { snapshot, why },
                })
            }
        }
    }

    /// The local path of `file`, downloaded if needed.
    fn get(&self, file: &str) -> Result<PathBuf> {
        let missing = |why: &str| {
            anyhow::anyhow!(
                "{}: `{file}` is not in the Hugging Face cache {} ({why})",
                self.location,
                cache_dir().display()
            )
        };
        match &self.source {
            Source::Cache { snapshot, why } => {
                let path = snapshot.join(file);
                if path.exists() {
                    Ok(path)
                } else {
                    Err(missing(why))
                }
            }
            Source::Online(repo) => repo
                .get(file)
                .with_context(|| format!("{}: cannot download `{file}`", self.location)),
        }
    }

    fn has(&self, file: &str) -> bool {
        self.files.contains(file)
    }

    /// Fetches what `needs` asks for under `location` and returns its local directory.
    fn fetch_for(&self, location: &HubLocation, needs: Needs) -> Result<PathBuf> {
        let root = |file: &str| -> Result<PathBuf> {
            let path = self.get(&location.file(file))?;
            Ok(path.parent().map(Path::to_path_buf).unwrap_or_default())
        };
        match needs {
            Needs::Adapter => {
                self.get(&location.file("adapter_model.safetensors"))?;
                root("adapter_config.json")
            }
            Needs::PipelineOrTransformer if self.has(&location.file("model_index.json")) => {
                for component in ["transformer", "vae"] {
                    if self.has(&location.file(&format!("{component}/config.json"))) {
                        self.fetch_weights(&location.file(component), "diffusion_pytorch_model")?;
                    }
                }
                if self.has(&location.file("text_encoder/config.json")) {
                    self.fetch_weights(&location.file("text_encoder"), "model")?;
                }
                for file in [
                    "scheduler/scheduler_config.json",
                    "tokenizer/tokenizer.json",
                    "tokenizer/tokenizer_config.json",
                    "tokenizer/special_tokens_map.json",
                    "tokenizer/spiece.model",
                ] {
                    if self.has(&location.file(file)) {
                        self.get(&location.file(file))?;
                    }
                }
                root("model_index.json")
            }
            Needs::Transformer | Needs::PipelineOrTransformer => {
                let folder = if !self.has(&location.file("config.json"))
                    && self.has(&location.file("transformer/config.json"))
                {
                    location.file("transformer")
                } else {
                    location.file("")
                };
                let folder = folder.trim_end_matches('/').to_string();
                self.fetch_weights(&folder, "diffusion_pytorch_model")
            }
        }
    }

    /// A model folder's `config.json` and weights (`<stem>.safetensors`, or the shards
    /// `<stem>.safetensors.index.json` names); returns the folder's local path.
    fn fetch_weights(&self, folder: &str, stem: &str) -> Result<PathBuf> {
        let in_folder = |name: &str| {
            if folder.is_empty() {
                name.to_string()
            } else {
                format!("{folder}/{name}")
            }
        };
        let config = self.get(&in_folder("config.json"))?;
        let index = in_folder(&format!("{stem}.safetensors.index.json"));
        if self.has(&index) {
            let index_path = self.get(&index)?;
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&index_path)
                    .with_context(|| format!("cannot read {}", index_path.display()))?,
            )
            .with_context(|| format!("{}: `{index}` is not JSON", self.location))?;
            let shards: BTreeSet<&str> = json["weight_map"]
                .as_object()
                .with_context(|| format!("{}: `{index}` has no weight_map", self.location))?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            for shard in shards {
                self.get(&in_folder(shard))?;
            }
        } else {
            self.get(&in_folder(&format!("{stem}.safetensors")))?;
        }
        Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
    }
}

/// The cached snapshot of `revision`: `snapshots/<commit>` where `refs/<revision>` names
/// the commit, or the revision itself when it is a commit.
fn cached_snapshot(cache: &Path, repo: &Repo, revision: &str) -> Option<PathBuf> {
    let folder = cache.join(repo.folder_name());
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .ok()
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|| revision.to_string());
    let snapshot = folder.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

/// Every file below `dir`, as `a/b/c` paths relative to it.
fn list_files(dir: &Path) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(dir) {
                files.insert(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_with_folders_and_revisions() {
        let parsed = HubLocation::parse("maxin-cn/Latte-1/transformer@v1.0").unwrap();
        assert_eq!(parsed.repo, "maxin-cn/Latte-1");
        assert_eq!(parsed.subfolder, "transformer");
        assert_eq!(parsed.revision, "v1.0");
        assert_eq!(HubLocation::parse("org/name").unwrap().revision, "main");
        for bad in [
            "name",
            "org/",
            "/abs/path",
            "org/name@",
            "a/../b",
            "org/na me",
        ] {
            assert!(HubLocation::parse(bad).is_none(), "{bad}");
        }
    }
}
