//! Options shared by every subcommand.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};

/// Device, logging and randomness.
#[derive(Debug, Args)]
pub struct GlobalOptions {
    /// Where to compute: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// Seed for weights, inputs and noise that the command generates.
    #[arg(long, global = true, default_value_t = 0)]
    pub seed: u64,
    /// More log output (-v info, -vv debug, -vvv trace); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
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
            .init();
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
                    None => 0,
                };
                Device::new_cuda(ordinal).with_context(|| {
                    format!("--device {spec}: this build has no usable CUDA device")
                })?
            }
            other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        };
        Ok(device)
    }
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
}
