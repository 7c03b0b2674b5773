//! Options shared by every subcommand.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use latte::costs::{Kernels, Memory};
use latte::lora::{LoraConfig, TargetModules};

/// Device, logging and randomness.
#[derive(Debug, Args)]
pub struct GlobalOptions {
    /// Where to compute: `cpu`, `cuda` (under mpirun or srun, the GPU of the rank's index
    /// on its machine) or `cuda:N`.
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// Seed for weights, inputs and noise that the command generates.
    #[arg(long, global = true, default_value_t = 0)]
    pub seed: u64,
    /// More log output (-v info, -vv debug, -vvv trace); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Kernels for attention, adaLN's norm, GELU and biased products: `fused` (latte-rs's
    /// CPU kernels) or `generic` (tensor ops on any device) [default: fused on the CPU,
    /// generic elsewhere].
    #[arg(long, global = true, value_name = "fused|generic")]
    pub kernels: Option<Kernels>,
}

impl GlobalOptions {
    /// Installs the log subscriber on stderr.
    pub fn init_tracing(&self) {
        let level = match self.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }

    /// The kernel set for `--device`: `--kernels`, else the device's default. Fused kernels
    /// exist on the CPU only.
    pub fn kernels(&self) -> Result<Kernels> {
        let memory = Memory::of_device_name(&self.device);
        match self.kernels {
            Some(Kernels::Fused) if memory == Memory::Device => bail!(
                "--kernels fused: the fused kernels run on the CPU; use --kernels generic with \
                 --device {}",
                self.device
            ),
            Some(kernels) => Ok(kernels),
            None => Ok(Kernels::for_device_name(&self.device)),
        }
    }

    /// The selected device. (Randomness comes from `latte::random`, seeded by `--seed`.)
    pub fn device(&self) -> Result<Device> {
        let device = match self.device.as_str() {
            "cpu" => Device::Cpu,
            spec if spec == "cuda" || spec.starts_with("cuda:") => {
                let ordinal = match spec.strip_prefix("cuda:") {
                    Some(n) => n
                        .parse()
                        .with_context(|| format!("--device {spec}: bad GPU index"))?,
                    // Under a launcher, each rank of a machine takes its own GPU.
                    None => local_rank().unwrap_or(0),
                };
                cuda_device(spec, ordinal)?
            }
            other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        };
        Ok(device)
    }
}

/// This process's rank among the ranks of its machine, as MPI launchers and SLURM set it.
fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.parse().ok())
}

/// Opens GPU `ordinal`, after checking that the CUDA libraries load: cudarc loads them
/// on first use and panics, rather than failing, when one is missing.
#[cfg(feature = "cuda")]
fn cuda_device(spec: &str, ordinal: usize) -> Result<Device> {
    use candle_core::cuda_backend::cudarc::{cublas, curand, driver};
    // SAFETY: each call only tries to dlopen the library under its usual names.
    let libraries = unsafe {
        [
            (
                "libcuda.so (the NVIDIA driver)",
                driver::sys::is_culib_present(),
            ),
            ("libcublas.so (cuBLAS)", cublas::sys::is_culib_present()),
            ("libcurand.so (cuRAND)", curand::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = libraries
        .iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "--device {spec}: cannot load {}. The GPU build needs the NVIDIA driver and the \
             CUDA 13 (or 12) cuBLAS and cuRAND libraries on the loader path, e.g. \
             LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib from the nvidia-cublas and \
             nvidia-curand wheels, or /usr/local/cuda/lib64",
            missing.join(", ")
        );
    }
    let device = Device::new_cuda(ordinal)
        .with_context(|| format!("--device {spec}: cannot open GPU {ordinal}"))?;
    keep_freed_memory(&device)
        .with_context(|| format!("--device {spec}: cannot configure the memory pool"))?;
    Ok(device)
}

/// Lets the device's memory pool (which candle's stream-ordered allocations draw from)
/// keep the memory freed to it. Its default release threshold, 0, hands every freed byte
/// back to the driver at each synchronisation, so that every step would map its memory
/// afresh; PyTorch's caching allocator keeps it too. `used` memory, which the meter
/// reads, is unaffected.
#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let context = device.as_cuda_device()?.cuda_stream().context().clone();
    if !context.has_async_alloc() {
        return Ok(()); // no pools: cudarc allocates with cuMemAlloc
    }
    context.bind_to_thread()?;
    // SAFETY: the device of a live context; RELEASE_THRESHOLD is a `cuuint64_t`.
    unsafe {
        let pool = result::device::get_mem_pool(context.cu_device())?;
        let mut keep_all = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep_all as *mut u64).cast(),
        )?;
    }
    Ok(())
}

/// Without the `cuda` feature there is no GPU backend to open.
#[cfg(not(feature = "cuda"))]
fn cuda_device(spec: &str, _ordinal: usize) -> Result<Device> {
    bail!(
        "--device {spec}: this `latte` binary was built without CUDA; rebuild it with \
         `--features cuda` (tools/build-cuda.sh)"
    )
}

/// Floating-point precision of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// The library's precision.
    pub fn training(self) -> latte::train::Precision {
        match self {
            Precision::F32 => latte::train::Precision::F32,
            Precision::F16 => latte::train::Precision::F16,
            Precision::Bf16 => latte::train::Precision::Bf16,
        }
    }
}

/// The LoRA flags of `latte train`, `latte plan` and `latte profile`.
#[derive(Debug, Clone, Args)]
pub struct LoraArgs {
    /// Train LoRA adapters of this rank instead of every weight: the base model frozen in
    /// the run's precision, the adapters in f32 (checkpoints in PEFT's format).
    #[arg(long, value_name = "RANK", value_parser = clap::value_parser!(u64).range(1..))]
    pub lora: Option<u64>,
    /// LoRA's α: updates are scaled by α / rank [default: the rank].
    #[arg(long, value_name = "ALPHA", requires = "lora")]
    pub lora_alpha: Option<f64>,
    /// Layers to adapt, as PEFT's target_modules: module names or name suffixes,
    /// comma-separated (e.g. to_q,to_v,ff.net.2) [default: to_k,to_q,to_v,to_out.0].
    #[arg(long, value_name = "NAMES", value_delimiter = ',', requires = "lora")]
    pub lora_targets: Option<Vec<String>>,
}

impl LoraArgs {
    /// The adapter configuration the flags ask for, as diffusers' LoRA training scripts
    /// make it (α = rank, Gaussian initialisation of `A`), if any.
    pub fn config(&self) -> Option<LoraConfig> {
        let rank = self.lora? as usize;
        let targets = match &self.lora_targets {
            Some(names) => TargetModules::Names(names.clone()),
            None => TargetModules::default_targets(),
        };
        let mut config = LoraConfig::new(rank, self.lora_alpha.unwrap_or(rank as f64), targets);
        config.init_lora_weights = "gaussian".into();
        Some(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        global: GlobalOptions,
    }

    fn on(device: &str) -> GlobalOptions {
        <Cli as clap::Parser>::parse_from(["latte", "--device", device]).global
    }

    #[test]
    fn devices_parse() {
        assert!(on("cpu").device().expect("cpu").is_cpu());
        let bad = on("tpu").device().expect_err("no tpu");
        assert!(
            bad.to_string().contains("expected cpu, cuda or cuda:N"),
            "{bad}"
        );
        let index = on("cuda:x").device().expect_err("bad index");
        assert!(index.to_string().contains("bad GPU index"), "{index}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_says_the_binary_has_none() {
        for spec in ["cuda", "cuda:1"] {
            let e = on(spec).device().expect_err("no CUDA in this build");
            assert!(e.to_string().contains("built without CUDA"), "{e}");
        }
    }
}
