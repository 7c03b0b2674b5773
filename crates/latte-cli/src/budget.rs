//! `--budget SIZE | auto`: the memory a command may use, as the user names it.
//!
//! `auto` asks the device's meter what a new workload could still take (the system's
//! `MemAvailable` on the CPU, the GPU's free memory on CUDA) and leaves
//! [`AUTO_BUDGET_MARGIN`] of it free for what the plan does not count (the allocator's
//! slack, other processes, the CUDA context's growth).

use anyhow::{bail, Result};
use remat::meter::{format_bytes, MemoryMeter};
use remat::policy::ByteSize;
use std::ops::Deref;

/// Share of the available memory `--budget auto` leaves free.
pub const AUTO_BUDGET_MARGIN: f64 = 0.10;

/// `--budget SIZE` or `--budget auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetChoice {
    /// Bytes.
    Bytes(u64),
    /// The device's available memory minus [`AUTO_BUDGET_MARGIN`].
    Auto,
}

/// Clap value parser: a size with an optional KiB/MiB/GiB suffix, or `auto`.
pub fn parse_budget(text: &str) -> Result<BudgetChoice, String> {
    if text == "auto" {
        return Ok(BudgetChoice::Auto);
    }
    text.parse::<ByteSize>()
        .map(|size| BudgetChoice::Bytes(size.0))
        .map_err(|e| e.to_string())
}

/// A budget in bytes and where it came from, for the run's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedBudget {
    /// The budget.
    pub bytes: u64,
    /// `--budget`, or how `auto` was sized.
    pub source: String,
}

impl BudgetChoice {
    /// The budget in bytes; `auto` makes the device's meter with `meter` and reads its
    /// available memory (a size never needs one).
    ///
    /// # Errors
    /// `auto` with a meter that cannot be made or cannot tell its available memory.
    pub fn resolve<M: Deref<Target = dyn MemoryMeter>>(
        self,
        meter: impl FnOnce() -> Result<M>,
    ) -> Result<ResolvedBudget> {
        match self {
            BudgetChoice::Bytes(bytes) => Ok(ResolvedBudget {
                bytes,
                source: "--budget".to_string(),
            }),
            BudgetChoice::Auto => {
                let meter = meter()?;
                let Some(available) = meter.available_bytes() else {
                    bail!(
                        "--budget auto cannot read the available memory of {} (on the CPU it \
                         needs /proc/meminfo); give the budget as a size, e.g. --budget 16GiB",
                        meter.name()
                    );
                };
                Ok(ResolvedBudget {
                    bytes: (available as f64 * (1.0 - AUTO_BUDGET_MARGIN)) as u64,
                    source: format!(
                        "auto: {} available on {}, minus a {:.0} % margin",
                        format_bytes(available),
                        meter.name(),
                        100.0 * AUTO_BUDGET_MARGIN
                    ),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remat::meter::ManualMeter;

    #[test]
    fn sizes_and_auto_parse() {
        assert_eq!(parse_budget("auto"), Ok(BudgetChoice::Auto));
        assert_eq!(parse_budget("2KiB"), Ok(BudgetChoice::Bytes(2048)));
        assert!(parse_budget("lots").is_err());
    }

    #[test]
    fn auto_leaves_the_margin_of_what_is_available() {
        let meter = || {
            Ok(
                Box::new(ManualMeter::new("test").with_available_bytes(1000))
                    as Box<dyn MemoryMeter>,
            )
        };
        let budget = BudgetChoice::Auto.resolve(meter).expect("available");
        assert_eq!(budget.bytes, 900);
        assert!(budget.source.contains("test"), "{}", budget.source);
        assert_eq!(
            BudgetChoice::Bytes(7)
                .resolve(|| -> Result<Box<dyn MemoryMeter>> { bail!("a size needs no meter") })
                .expect("bytes")
                .bytes,
            7
        );
    }

    #[test]
    fn auto_without_a_reading_says_what_to_give() {
        let err = BudgetChoice::Auto
            .resolve(|| Ok(Box::new(ManualMeter::new("blind")) as Box<dyn MemoryMeter>))
            .expect_err("no reading");
        assert!(err.to_string().contains("--budget 16GiB"), "{err}");
    }
}
