//! `latte`: run the Latte video diffusion transformer with gradients, within the memory
//! you have. One file per subcommand under `cmd/`.

mod budget;
mod cmd;
mod ffmpeg;
mod hub;
#[cfg(feature = "mpi")]
mod mpi_group;
#[cfg(feature = "nccl")]
mod nccl_group;
mod options;

use clap::{Parser, Subcommand};
use latte::costs::Kernels;
use options::GlobalOptions;

remat::install_counting_allocator!();

/// Latte video diffusion with gradients — fine-tuning and gradient-guided sampling —
/// under a planned memory budget.
#[derive(Debug, Parser)]
#[command(name = "latte", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: GlobalOptions,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parameter counts per part and weight bytes per dtype of a model.
    Inspect(cmd::inspect::Args),
    /// Run the transformer forward (and optionally its vector-Jacobian product).
    Forward(cmd::forward::Args),
    /// Step time and measured peak memory under several checkpoint policies.
    Bench(cmd::bench::Args),
    /// Train or fine-tune within a checkpoint policy or a memory budget.
    Train(cmd::train::Args),
    /// Sample a video (DDIM, classifier-free and gradient guidance under a memory plan).
    Sample(cmd::sample::Args),
    /// The cheapest checkpoint policy, batch and precision that fit a memory budget.
    Plan(cmd::plan::Args),
    /// Run the chosen plan a few steps and plot its memory timeline (JSON, SVG, PNG).
    Profile(cmd::profile::Args),
    /// Merge a LoRA adapter (PEFT's format) into a model directory.
    MergeLora(cmd::merge_lora::Args),
    /// Encode a folder of videos and captions into training clips (needs ffmpeg).
    Encode(cmd::encode::Args),
}

fn main() -> std::process::ExitCode {
    // Activations are freed and allocated again every step: keep their pages.
    remat::host_heap::retain_freed_memory();
    let cli = Cli::parse();
    cli.global.init_tracing();
    // The model's ops run the chosen kernels on this thread for the whole command.
    let _kernels = match cli.global.kernels() {
        Ok(kernels) => Kernels::choose(Some(kernels)),
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Inspect(args) => cmd::inspect::run(args, &cli.global),
        Command::Forward(args) => cmd::forward::run(args, &cli.global),
        Command::Bench(args) => cmd::bench::run(args, &cli.global),
        Command::Train(args) => cmd::train::run(args, &cli.global),
        Command::Sample(args) => cmd::sample::run(args, &cli.global),
        Command::Plan(args) => cmd::plan::run(args, &cli.global),
        Command::Profile(args) => cmd::profile::run(args, &cli.global),
        Command::MergeLora(args) => cmd::merge_lora::run(args),
        Command::Encode(args) => cmd::encode::run(args, &cli.global),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
