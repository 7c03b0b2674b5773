//! `latte inspect`: what a model is made of.

use crate::cmd::model_source::ModelSource;
use anyhow::Result;
use clap::Args as ClapArgs;
use latte::weights::{parameter_specs, ParamSpec};
use remat::meter::format_bytes;
use serde::Serialize;
use std::collections::BTreeMap;

/// Arguments of `latte inspect`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    source: ModelSource,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Inspection {
    parts: Vec<Part>,
    total_parameters: usize,
    /// Bytes of the weights per stored dtype (a model directory), or per dtype they would
    /// take (a config or preset).
    weight_bytes: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize)]
struct Part {
    name: String,
    tensors: usize,
    parameters: usize,
}

/// The part a parameter belongs to: its top-level module (`transformer_blocks.3.…` →
/// `transformer_blocks`); `scale_shift_table` and `proj_out` form the output layers.
fn part_of(name: &str) -> &str {
    match name.split('.').next().unwrap_or(name) {
        "scale_shift_table" | "proj_out" => "output layers",
        top => top,
    }
}

fn inspect(specs: &[ParamSpec]) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    for spec in specs {
        let name = part_of(&spec.name);
        match parts.iter_mut().find(|p| p.name == name) {
            Some(part) => {
                part.tensors += 1;
                part.parameters += spec.numel();
            }
            None => parts.push(Part {
                name: name.to_string(),
                tensors: 1,
                parameters: spec.numel(),
            }),
        }
    }
    parts
}

/// Thousands separators: 1057246880 → 1,057,246,880.
pub fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Runs `latte inspect`.
pub fn run(args: Args, _global: &crate::options::GlobalOptions) -> Result<()> {
    let resolved = args.source.resolve()?;
    let specs = parameter_specs(&resolved.config)?;
    let parts = inspect(&specs);
    let total: usize = parts.iter().map(|p| p.parameters).sum();
    let weight_bytes = match &resolved.dir {
        Some(dir) => dir
            .stored_dtypes()
            .into_iter()
            .map(|(dtype, (bytes, _))| (dtype, bytes))
            .collect(),
        None => [("F32", 4), ("F16", 2), ("BF16", 2)]
            .into_iter()
            .map(|(dtype, size)| (dtype.to_string(), total * size))
            .collect(),
    };
    let inspection = Inspection {
        parts,
        total_parameters: total,
        weight_bytes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inspection)?);
        return Ok(());
    }
    println!("{}", resolved.description);
    println!("{:<30} {:>8} {:>16}", "part", "tensors", "parameters");
    for part in &inspection.parts {
        println!(
            "{:<30} {:>8} {:>16}",
            part.name,
            part.tensors,
            grouped(part.parameters)
        );
    }
    println!("{:<30} {:>8} {:>16}", "total", specs.len(), grouped(total));
    let label = if resolved.dir.is_some() {
        "stored weights"
    } else {
        "weights would take"
    };
    for (dtype, bytes) in &inspection.weight_bytes {
        println!(
            "{label} ({dtype}): {} ({bytes} bytes)",
            format_bytes(*bytes as u64)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latte_1_has_the_published_parameter_count() {
        let specs = parameter_specs(&latte::config::latte_1().config).unwrap();
        let parts = inspect(&specs);
        let count = |name: &str| parts.iter().find(|p| p.name == name).unwrap().parameters;
        assert_eq!(
            parts.iter().map(|p| p.parameters).sum::<usize>(),
            1_057_246_880
        );
        assert_eq!(count("transformer_blocks"), 28 * 21_255_552);
        assert_eq!(count("temporal_transformer_blocks"), 28 * 15_942_528);
        assert_eq!(count("pos_embed"), 19_584);
        // timestep MLP 256→1152→1152, modulation 1152→6·1152, each with bias
        assert_eq!(count("adaln_single"), 296_064 + 1_328_256 + 7_969_536);
        // caption projection 4096→1152→1152, with biases
        assert_eq!(count("caption_projection"), 4_719_744 + 1_328_256);
        assert_eq!(count("output layers"), 39_200);
    }

    #[test]
    fn grouping_inserts_separators() {
        assert_eq!(grouped(1_057_246_880), "1,057,246,880");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
    }
}
