//! How fresh weights start.
//!
//! Two schemes: PyTorch's module defaults (what `LatteTransformer3DModel(config)` holds
//! before any weights are loaded: the benchmarks, tests and parity fixtures use them), and
//! the scheme a model trained from scratch starts from — PixArt-α's `initialize_weights`,
//! from which Latte-1 was initialised:
//!
//! - every linear (and the patch embedding, as a linear on the flattened kernel): Xavier
//!   uniform, bounds ±√(6 / (fan_in + fan_out)), bias 0;
//! - the timestep embedder, the timestep block `adaln_single.linear` and the caption
//!   projection: weights N(0, 0.02²);
//! - the output projections of cross-attention and of the final layer (`proj_out`): zero,
//!   so that every spatial block starts without the caption's influence and the model
//!   starts by predicting ε = 0;
//! - `scale_shift_table`s as the module creates them (N(0, 1/dim)).
//!
//! Starting from zero outputs matters for small models trained briefly: with PyTorch's
//! defaults the untrained model's ε prediction has unit-scale noise that training must
//! first unlearn.

use crate::weights::ParamSpec;
use candle_nn::Init;

/// Standard deviation of PixArt-α's normal initialisations.
const EMBEDDING_STDEV: f64 = 0.02;

/// A scheme for fresh weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initialisation {
    /// PyTorch's module defaults (as the model declares them).
    ModuleDefaults,
    /// PixArt-α's `initialize_weights`: for training from scratch.
    FromScratch,
}

impl Initialisation {
    /// The initialisation of one parameter under this scheme.
    pub fn of(self, spec: &ParamSpec) -> Init {
        match self {
            Self::ModuleDefaults => spec.init,
            Self::FromScratch => from_scratch(spec),
        }
    }
}

fn from_scratch(spec: &ParamSpec) -> Init {
    let name = spec.name.as_str();
    let is_weight = name.ends_with(".weight") && spec.shape.len() >= 2;
    let is_bias = name.ends_with(".bias");
    if !is_weight && !is_bias {
        return spec.init;
    }
    let zeroed = name.starts_with("proj_out.") || name.contains(".attn2.to_out.0.");
    if zeroed || is_bias {
        return Init::Const(0.0);
    }
    if name.starts_with("adaln_single.") || name.starts_with("caption_projection.") {
        return Init::Randn {
            mean: 0.0,
            stdev: EMBEDDING_STDEV,
        };
    }
    let fan_out = spec.shape[0];
    let fan_in: usize = spec.shape[1..].iter().product();
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tiny;
    use crate::weights::parameter_specs;

    fn find<'a>(specs: &'a [ParamSpec], name: &str) -> &'a ParamSpec {
        specs
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
    }

    #[test]
    fn from_scratch_follows_pixart() {
        let specs = parameter_specs(&tiny().config).unwrap();
        let scheme = Initialisation::FromScratch;
        for zero in [
            "proj_out.weight",
            "proj_out.bias",
            "transformer_blocks.0.attn2.to_out.0.weight",
            "transformer_blocks.0.attn1.to_q.bias",
        ] {
            assert!(
                matches!(scheme.of(find(&specs, zero)), Init::Const(v) if v == 0.0),
                "{zero}"
            );
        }
        let q = find(&specs, "transformer_blocks.0.attn1.to_q.weight");
        let bound = (6.0 / (q.shape[0] + q.shape[1]) as f64).sqrt();
        assert!(matches!(scheme.of(q), Init::Uniform { lo, up } if lo == -bound && up == bound));
        let t = find(&specs, "adaln_single.emb.timestep_embedder.linear_1.weight");
        assert!(matches!(scheme.of(t), Init::Randn { stdev, .. } if stdev == EMBEDDING_STDEV));
        let table = find(&specs, "transformer_blocks.0.scale_shift_table");
        assert_eq!(
            format!("{:?}", scheme.of(table)),
            format!("{:?}", table.init)
        );
        // Temporal blocks have no cross-attention, but their self-attention is Xavier.
        let temporal = find(
            &specs,
            "temporal_transformer_blocks.0.attn1.to_out.0.weight",
        );
        assert!(matches!(scheme.of(temporal), Init::Uniform { .. }));
    }

    /// PyTorch's defaults, written out independently of the model's declarations:
    /// `nn.Linear` and `nn.Conv2d` (weight and bias) U(±1/√fan_in) with fan_in the
    /// input features (× kernel area), `scale_shift_table` N(0, 1/dim).
    #[test]
    fn module_defaults_are_pytorchs() {
        for spec in parameter_specs(&tiny().config).unwrap() {
            let init = Initialisation::ModuleDefaults.of(&spec);
            if spec.name.ends_with("scale_shift_table") {
                let dim = spec.shape[1] as f64;
                assert!(
                    matches!(init, Init::Randn { mean, stdev }
                        if mean == 0.0 && (stdev - 1.0 / dim.sqrt()).abs() < 1e-12),
                    "{}: {init:?}",
                    spec.name
                );
                continue;
            }
            let weight = weight_shape_of(&spec);
            let fan_in: usize = weight.iter().skip(1).product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            assert!(
                matches!(init, Init::Uniform { lo, up }
                    if (lo + bound).abs() < 1e-12 && (up - bound).abs() < 1e-12),
                "{}: {init:?}, expected U(±{bound})",
                spec.name
            );
        }
    }

    /// The shape of the weight a parameter belongs to (a bias's layer's weight).
    fn weight_shape_of(spec: &ParamSpec) -> Vec<usize> {
        if spec.name.ends_with(".bias") {
            let weight = spec.name.replace(".bias", ".weight");
            let specs = parameter_specs(&tiny().config).unwrap();
            find(&specs, &weight).shape.clone()
        } else {
            spec.shape.clone()
        }
    }
}
