//! Which implementation of the memory-critical ops a model runs: latte-rs's fused CPU
//! kernels, or the device-generic ones built from tensor ops (cuBLAS and candle's kernels
//! on CUDA), which also run on the CPU so that the GPU path is tested everywhere.
//!
//! The choice is made per thread, as PyTorch's `sdp_kernel` context manager does: the
//! model's ops read [`Kernels::active`] on the thread that runs the model (where the
//! forward, the backward and remat's recomputation run; worker threads only execute
//! kernels). Without a choice, the CPU runs the fused kernels and every other device the
//! generic ones ([`Kernels::active`]).

use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

/// The implementation of attention, adaLN's norm, GELU and the biased products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// latte-rs's CPU kernels with their own backward: fused attention, norm, GELU and
    /// biased products (f32).
    Fused,
    /// Tensor ops on any device: chunked memory-efficient attention, composed norm, GELU
    /// and products.
    Generic,
}

thread_local! {
    static CHOSEN: Cell<Option<Kernels>> = const { Cell::new(None) };
}

impl Kernels {
    /// The default for a device named on the command line (`cpu`, `cuda`, `cuda:1`).
    pub fn for_device_name(device: &str) -> Self {
        if device == "cpu" {
            Kernels::Fused
        } else {
            Kernels::Generic
        }
    }

    /// The kernels this thread runs on `device`: the choice made with [`Kernels::choose`],
    /// else the device's default. Fused kernels exist on the CPU only.
    pub fn active(device: &Device) -> Self {
        if device.is_cpu() {
            CHOSEN.with(Cell::get).unwrap_or(Kernels::Fused)
        } else {
            Kernels::Generic
        }
    }

    /// Whether this thread runs the fused CPU kernels on `device`.
    pub fn fused_on(device: &Device) -> bool {
        Kernels::active(device) == Kernels::Fused
    }

    /// Makes `choice` (or the device default, with `None`) this thread's kernels until the
    /// returned guard is dropped.
    pub fn choose(choice: Option<Kernels>) -> KernelChoice {
        KernelChoice {
            previous: CHOSEN.with(|c| c.replace(choice)),
        }
    }
}

/// Restores the previous kernel choice of its thread when dropped.
#[derive(Debug)]
#[must_use = "the choice lasts as long as the guard"]
pub struct KernelChoice {
    previous: Option<Kernels>,
}

impl Drop for KernelChoice {
    fn drop(&mut self) {
        CHOSEN.with(|c| c.set(self.previous));
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernels::Fused => "fused",
            Kernels::Generic => "generic",
        })
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "fused" => Ok(Kernels::Fused),
            "generic" => Ok(Kernels::Generic),
            other => Err(format!("kernels `{other}`: expected fused or generic")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_choice_lasts_as_long_as_its_guard() {
        let cpu = Device::Cpu;
        assert_eq!(Kernels::active(&cpu), Kernels::Fused);
        {
            let _generic = Kernels::choose(Some(Kernels::Generic));
            assert_eq!(Kernels::active(&cpu), Kernels::Generic);
            {
                let _default = Kernels::choose(None);
                assert_eq!(Kernels::active(&cpu), Kernels::Fused);
            }
            assert_eq!(Kernels::active(&cpu), Kernels::Generic);
        }
        assert_eq!(Kernels::active(&cpu), Kernels::Fused);
        assert_eq!("generic".parse(), Ok(Kernels::Generic));
        assert!("flash".parse::<Kernels>().is_err());
    }
}
