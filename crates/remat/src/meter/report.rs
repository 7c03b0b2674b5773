//! The memory report: a serialisable timeline of phases, its JSON file and a
//! one-line summary.
//!
//! All byte counts in a report are *above the baseline*: the bytes that were
//! live when the recording started (weights, inputs, everything allocated
//! before) are subtracted, saturating at 0.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// What a [`Recorder`](super::Recorder) measured, ready to be written as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Name of the meter that took the readings, e.g. `"cpu-heap"`.
    pub meter: String,
    /// Bytes live when the recording started; every other count is above it.
    pub baseline_bytes: u64,
    /// Highest live bytes above the baseline during the recording: the
    /// maximum of the phases' `peak_bytes`, 0 for an empty timeline.
    pub peak_bytes: u64,
    /// Capacity of the measured device, when the meter knows it (`null` otherwise).
    #[serde(default)]
    pub device_total_bytes: Option<u64>,
    /// Seconds from the start of the recording to its finish.
    pub duration_s: f64,
    /// Bytes the recorder itself kept live (timeline storage, phase names) and
    /// subtracted from the readings; 0 for meters that do not see the host heap.
    #[serde(default)]
    pub bookkeeping_bytes: u64,
    /// The phases in the order they ran; together they cover the recording.
    pub timeline: Vec<Phase>,
}

/// One phase of a recording, from one mark to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// The name given when the phase was opened; names may repeat, and `/`
    /// separates the levels of nested names (see [`MemoryReport::totals_by_prefix`]).
    pub name: String,
    /// Seconds from the start of the recording to the start of the phase.
    pub start_s: f64,
    /// Seconds from the start of the recording to the end of the phase.
    pub end_s: f64,
    /// Live bytes above the baseline when the phase started.
    pub start_bytes: u64,
    /// Live bytes above the baseline when the phase ended.
    pub end_bytes: u64,
    /// Highest live bytes above the baseline during the phase; at least
    /// `start_bytes` and `end_bytes`.
    pub peak_bytes: u64,
}

impl Phase {
    /// Length of the phase in seconds.
    pub fn duration_s(&self) -> f64 {
        self.end_s - self.start_s
    }
}

/// The phases of a report that share a name (or a name prefix), added up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTotals {
    /// The shared name or name prefix.
    pub name: String,
    /// How many phases carry it.
    pub count: usize,
    /// Their summed duration in seconds.
    pub total_s: f64,
    /// The highest of their `peak_bytes`.
    pub max_peak_bytes: u64,
}

impl MemoryReport {
    /// The recordings of consecutive runs as one timeline, each run's phases under its
    /// label (`label/phase`), shifted to the end of the run before and to the first run's
    /// baseline; `None` without a recording.
    pub fn concatenated(runs: &[(String, MemoryReport)]) -> Option<MemoryReport> {
        let (_, first) = runs.first()?;
        let mut joined = MemoryReport {
            timeline: Vec::new(),
            peak_bytes: 0,
            duration_s: 0.0,
            bookkeeping_bytes: 0,
            ..first.clone()
        };
        for (label, run) in runs {
            let shift =
                |bytes: u64| (bytes + run.baseline_bytes).saturating_sub(first.baseline_bytes);
            let offset = joined.duration_s;
            joined
                .timeline
                .extend(run.timeline.iter().map(|phase| Phase {
                    name: format!("{label}/{}", phase.name),
                    start_s: offset + phase.start_s,
                    end_s: offset + phase.end_s,
                    start_bytes: shift(phase.start_bytes),
                    end_bytes: shift(phase.end_bytes),
                    peak_bytes: shift(phase.peak_bytes),
                }));
            joined.peak_bytes = joined.peak_bytes.max(shift(run.peak_bytes));
            joined.duration_s = offset + run.duration_s;
            joined.bookkeeping_bytes = joined.bookkeeping_bytes.max(run.bookkeeping_bytes);
        }
        Some(joined)
    }

    /// One line for logs, e.g.
    /// `peak 123.4 MiB above baseline over 12 phases, 0.84 s (cpu-heap)`.
    #[must_use]
    pub fn summary(&self) -> String {
        let phase_count = self.timeline.len();
        let plural = if phase_count == 1 { "" } else { "s" };
        format!(
            "peak {} above baseline over {phase_count} phase{plural}, {:.2} s ({})",
            format_bytes(self.peak_bytes),
            self.duration_s,
            self.meter
        )
    }

    /// Repeated phases added up by exact name, in order of first appearance.
    #[must_use]
    pub fn totals_by_name(&self) -> Vec<PhaseTotals> {
        self.totals_by_prefix(usize::MAX)
    }

    /// Phases added up by the first `depth` levels of their `/`-separated
    /// names, in order of first appearance: with depth 1, `backward/recompute/3`
    /// and `backward/grad/3` both count towards `backward`.
    #[must_use]
    pub fn totals_by_prefix(&self, depth: usize) -> Vec<PhaseTotals> {
        let mut totals: Vec<PhaseTotals> = Vec::new();
        for phase in &self.timeline {
            let key = name_prefix(&phase.name, depth);
            match totals.iter_mut().find(|total| total.name == key) {
                Some(total) => {
                    total.count += 1;
                    total.total_s += phase.duration_s();
                    total.max_peak_bytes = total.max_peak_bytes.max(phase.peak_bytes);
                }
                None => totals.push(PhaseTotals {
                    name: key.to_owned(),
                    count: 1,
                    total_s: phase.duration_s(),
                    max_peak_bytes: phase.peak_bytes,
                }),
            }
        }
        totals
    }

    /// Writes the report as pretty JSON to `path`, atomically: into a
    /// temporary file in the same directory, flushed to disk, then renamed over
    /// `path`. Readers see the old file or the whole new one, never a part;
    /// on error the temporary file is removed.
    ///
    /// # Errors
    ///
    /// [`ReportError::Io`] when the directory is missing or unwritable, or the
    /// rename fails; [`ReportError::Json`] if serialisation fails. Both name `path`.
    pub fn write_json(&self, path: impl AsRef<Path>) -> Result<(), ReportError> {
        let path = path.as_ref();
        let json = serde_json::to_vec_pretty(self).map_err(|source| ReportError::Json {
            path: path.to_owned(),
            source,
        })?;
        let temp_path = temp_path_beside(path);
        let written = write_synced(&temp_path, &json)
            .map_err(|source| ReportError::io(path, "write", source))
            .and_then(|()| {
                fs::rename(&temp_path, path)
                    .map_err(|source| ReportError::io(path, "move into place", source))
            });
        if written.is_err() {
            // Best effort: the file may not exist, and the first error matters more.
            let _ = fs::remove_file(&temp_path);
        }
        written
    }

    /// Reads a report written by [`MemoryReport::write_json`].
    ///
    /// # Errors
    ///
    /// [`ReportError::Io`] when the file cannot be read, [`ReportError::Json`]
    /// when it is not a report. Both name `path`.
    pub fn read_json(path: impl AsRef<Path>) -> Result<Self, ReportError> {
        let path = path.as_ref();
        let json = fs::read(path).map_err(|source| ReportError::io(path, "read", source))?;
        serde_json::from_slice(&json).map_err(|source| ReportError::Json {
            path: path.to_owned(),
            source,
        })
    }
}

/// The first `depth` `/`-separated levels of `name` (all of it if it has fewer).
fn name_prefix(name: &str, depth: usize) -> &str {
    if depth == 0 {
        return "";
    }
    match name.match_indices('/').nth(depth - 1) {
        Some((slash, _)) => &name[..slash],
        None => name,
    }
}

/// A fresh name in `path`'s directory: hidden, unique per process and call.
fn temp_path_beside(path: &Path) -> PathBuf {
    static NEXT_TEMP_ID: AtomicU64 = AtomicU64::new(0);
    let temp_id = NEXT_TEMP_ID.fetch_add(1, Ordering::Relaxed);
    let file_name = path.file_name().map_or_else(
        || "memory-report".to_owned(),
        |name| name.to_string_lossy().into_owned(),
    );
    let temp_name = format!(".{file_name}.{}.{temp_id}.tmp", std::process::id());
    path.with_file_name(temp_name)
}

/// Creates `path` (which must not exist), writes `bytes` and syncs them to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file: File = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Why a report could not be written or read; always names the report's path.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReportError {
    /// The file system refused.
    Io {
        /// The report's path (not the temporary file's).
        path: PathBuf,
        /// What was being done: `"write"`, `"move into place"` or `"read"`.
        operation: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The JSON could not be produced or parsed.
    Json {
        /// The report's path.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
}

impl ReportError {
    fn io(path: &Path, operation: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            operation,
            source,
        }
    }

    /// The report's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. } | Self::Json { path, .. } => path,
        }
    }
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                path,
                operation,
                source,
            } => write!(
                f,
                "cannot {operation} memory report {}: {source}",
                path.display()
            ),
            Self::Json { path, source } => {
                write!(
                    f,
                    "invalid JSON for memory report {}: {source}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for ReportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Json { source, .. } => Some(source),
        }
    }
}

/// Formats a byte count with binary units and one decimal: `512 B`,
/// `1.5 KiB`, `123.4 MiB`, `2.0 GiB`.
#[must_use]
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // 1023.95 and above would print as "1024.0": move to the next unit instead.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {

    #[test]
    fn concatenated_runs_follow_each_other_on_the_first_baseline() {
        let run = |baseline: u64, peak: u64| MemoryReport {
            meter: "test".into(),
            baseline_bytes: baseline,
            peak_bytes: peak,
            device_total_bytes: None,
            duration_s: 2.0,
            bookkeeping_bytes: 0,
            timeline: vec![Phase {
                name: "forward".into(),
                start_s: 0.5,
                end_s: 2.0,
                start_bytes: 0,
                end_bytes: 10,
                peak_bytes: peak,
            }],
        };
        let joined = MemoryReport::concatenated(&[
            ("step 1".into(), run(100, 50)),
            ("step 2".into(), run(110, 30)),
        ])
        .unwrap();
        assert_eq!(joined.baseline_bytes, 100);
        assert_eq!(joined.peak_bytes, 50);
        assert_eq!(joined.duration_s, 4.0);
        let second = &joined.timeline[1];
        assert_eq!(second.name, "step 2/forward");
        assert_eq!((second.start_s, second.end_s), (2.5, 4.0));
        assert_eq!((second.start_bytes, second.peak_bytes), (10, 40));
        assert!(MemoryReport::concatenated(&[]).is_none());
    }

    use super::*;

    const MIB: u64 = 1 << 20;

    fn phase(name: &str, start_s: f64, end_s: f64, peak_bytes: u64) -> Phase {
        Phase {
            name: name.to_owned(),
            start_s,
            end_s,
            start_bytes: 0,
            end_bytes: 0,
            peak_bytes,
        }
    }

    fn sample_report() -> MemoryReport {
        MemoryReport {
            meter: "cpu-heap".to_owned(),
            baseline_bytes: 7 * MIB,
            peak_bytes: 3 * MIB,
            device_total_bytes: Some(80 << 30),
            duration_s: 0.5,
            bookkeeping_bytes: 4096,
            timeline: vec![
                phase("forward", 0.0, 0.1, MIB),
                phase("backward/recompute/1", 0.1, 0.25, 3 * MIB),
                phase("backward/grad/1", 0.25, 0.3, 2 * MIB),
                phase("backward/recompute/0", 0.3, 0.5, MIB),
            ],
        }
    }

    /// A fresh, empty directory under the system temp dir.
    fn scratch_dir(label: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "remat-report-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("list dir")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn format_bytes_uses_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(MIB - 1), "1.0 MiB");
        assert_eq!(format_bytes(123 * MIB + 400 * 1024), "123.4 MiB");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn summary_is_one_line() {
        let summary = sample_report().summary();
        assert_eq!(
            summary,
            "peak 3.0 MiB above baseline over 4 phases, 0.50 s (cpu-heap)"
        );
        let mut single = sample_report();
        single.timeline.truncate(1);
        assert!(single.summary().contains("over 1 phase,"));
    }

    #[test]
    fn json_round_trip_preserves_the_report() {
        let report = sample_report();
        let json = serde_json::to_string(&report).expect("serialise");
        let back: MemoryReport = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, report);
    }

    #[test]
    fn json_uses_the_documented_field_names() {
        let value = serde_json::to_value(sample_report()).expect("serialise");
        for key in [
            "meter",
            "baseline_bytes",
            "peak_bytes",
            "device_total_bytes",
            "duration_s",
            "timeline",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        let first = &value["timeline"][0];
        for key in [
            "name",
            "start_s",
            "end_s",
            "start_bytes",
            "end_bytes",
            "peak_bytes",
        ] {
            assert!(first.get(key).is_some(), "missing timeline key {key}");
        }
    }

    #[test]
    fn optional_fields_may_be_missing_or_null() {
        let json = r#"{"meter":"cuda:0","baseline_bytes":1,"peak_bytes":2,
            "device_total_bytes":null,"duration_s":0.1,"timeline":[]}"#;
        let report: MemoryReport = serde_json::from_str(json).expect("parse");
        assert_eq!(report.device_total_bytes, None);
        assert_eq!(report.bookkeeping_bytes, 0);
    }

    #[test]
    fn totals_add_up_repeated_and_nested_phases() {
        let report = sample_report();
        let by_name = report.totals_by_name();
        assert_eq!(by_name.len(), 4);

        let by_top_level = report.totals_by_prefix(1);
        let names: Vec<&str> = by_top_level.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["forward", "backward"]);
        assert_eq!(by_top_level[1].count, 3);
        assert_eq!(by_top_level[1].max_peak_bytes, 3 * MIB);
        assert!((by_top_level[1].total_s - 0.4).abs() < 1e-9);

        let by_step = report.totals_by_prefix(2);
        let names: Vec<&str> = by_step.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["forward", "backward/recompute", "backward/grad"]);
        assert_eq!(by_step[1].count, 2);
    }

    #[test]
    fn name_prefix_cuts_at_slashes() {
        assert_eq!(name_prefix("a/b/c", 0), "");
        assert_eq!(name_prefix("a/b/c", 1), "a");
        assert_eq!(name_prefix("a/b/c", 2), "a/b");
        assert_eq!(name_prefix("a/b/c", 3), "a/b/c");
        assert_eq!(name_prefix("a", 5), "a");
    }

    #[test]
    fn write_json_replaces_the_file_and_leaves_no_temp_file() {
        let dir = scratch_dir("write");
        let path = dir.join("memory.json");
        fs::write(&path, "old contents").expect("seed");

        let report = sample_report();
        report.write_json(&path).expect("write report");

        assert_eq!(file_names(&dir), ["memory.json"]);
        assert_eq!(MemoryReport::read_json(&path).expect("read back"), report);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn write_json_into_a_missing_directory_names_the_path() {
        let dir = scratch_dir("missing");
        let path = dir.join("no-such-dir").join("memory.json");
        let error = sample_report().write_json(&path).expect_err("must fail");
        assert_eq!(error.path(), path);
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
        assert_eq!(file_names(&dir), Vec::<String>::new());
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn write_json_under_a_regular_file_names_the_path() {
        // Root may write anywhere, so a directory's permission bits cannot make
        // a portable test; a regular file in the parent's place always fails.
        let dir = scratch_dir("not-a-dir");
        let blocker = dir.join("blocker");
        fs::write(&blocker, "").expect("seed");
        let path = blocker.join("memory.json");
        let error = sample_report().write_json(&path).expect_err("must fail");
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn failed_rename_removes_the_temp_file() {
        let dir = scratch_dir("rename");
        let path = dir.join("memory.json");
        fs::create_dir(&path).expect("a directory where the report should go");
        fs::write(path.join("keep"), "").expect("make the directory non-empty");

        let error = sample_report().write_json(&path).expect_err("must fail");
        assert!(matches!(
            error,
            ReportError::Io {
                operation: "move into place",
                ..
            }
        ));
        assert!(error.to_string().contains("memory.json"), "{error}");
        assert_eq!(file_names(&dir), ["memory.json"]);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn read_json_of_garbage_names_the_path() {
        let dir = scratch_dir("garbage");
        let path = dir.join("memory.json");
        fs::write(&path, "{ not json").expect("seed");
        let error = MemoryReport::read_json(&path).expect_err("must fail");
        assert!(matches!(error, ReportError::Json { .. }));
        assert!(error.to_string().contains("memory.json"), "{error}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
