//! Checkpointing policies as users write them (`none`, `every:K`, `sqrt`,
//! `budget:SIZE`) and byte sizes in human units (`1.5GiB`, `512MB`).
//!
//! [`crate::planner::schedule_for`] turns a [`Policy`] into a schedule.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::schedule::Schedule;

/// A number of bytes. [`fmt::Display`] is for humans (`512.0 MiB`, one
/// decimal, binary units); [`ByteSize::to_exact_string`] is exact and parses
/// back; [`FromStr`] reads plain bytes or a decimal (`KB`, `MB`, `GB`, `TB`)
/// or binary (`KiB`, `MiB`, `GiB`, `TiB`) unit, possibly fractional (`1.5GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

/// Units accepted by [`ByteSize`]'s parser, as (suffix, bytes), largest first
/// within each system; matched case-insensitively.
const UNITS: [(&str, u64); 9] = [
    ("TiB", 1 << 40),
    ("TB", 1_000_000_000_000),
    ("GiB", 1 << 30),
    ("GB", 1_000_000_000),
    ("MiB", 1 << 20),
    ("MB", 1_000_000),
    ("KiB", 1 << 10),
    ("KB", 1_000),
    ("B", 1),
];

/// Why a text is not a byte size.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseSizeError {
    /// Nothing to parse.
    #[error("empty size: expected bytes or a number with a unit such as 512MiB or 1.5GB")]
    Empty,
    /// The number part is not a non-negative decimal number.
    #[error("`{0}` is not a size: expected bytes or a number with a unit such as 512MiB or 1.5GB")]
    BadNumber(String),
    /// The unit is not one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB.
    #[error("unknown size unit `{0}`: use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")]
    UnknownUnit(String),
    /// A fractional number of plain bytes.
    #[error("`{0}`: a byte count without a unit must be a whole number")]
    FractionalBytes(String),
    /// More than `u64::MAX` bytes.
    #[error("`{0}` is too large (at most {max} bytes)", max = u64::MAX)]
    TooLarge(String),
}

impl ByteSize {
    /// The exact text of the size with the largest unit that divides it
    /// (`2GiB`, `1536MiB`, `3GB`, `1000`); parses back to the same value.
    pub fn to_exact_string(&self) -> String {
        UNITS
            .iter()
            .filter(|(suffix, _)| *suffix != "B")
            .find(|(_, unit)| self.0 != 0 && self.0.is_multiple_of(*unit))
            .map_or_else(
                || self.0.to_string(),
                |(suffix, unit)| format!("{}{suffix}", self.0 / unit),
            )
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BINARY: [&str; 4] = ["TiB", "GiB", "MiB", "KiB"];
        for (power, suffix) in (1..=4).rev().zip(BINARY) {
            let unit = 1u64 << (10 * power);
            if self.0 >= unit {
                return write!(f, "{:.1} {suffix}", self.0 as f64 / unit as f64);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ParseSizeError::Empty);
        }
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = (&text[..split], text[split..].trim());
        let bad_number = || ParseSizeError::BadNumber(text.to_string());
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(bad_number());
        }
        let unit_bytes = if suffix.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(suffix))
                .map(|&(_, unit)| unit)
                .ok_or_else(|| ParseSizeError::UnknownUnit(suffix.to_string()))?
        };
        if !number.contains('.') {
            let whole: u64 = number
                .parse()
                .map_err(|_| ParseSizeError::TooLarge(text.to_string()))?;
            return whole
                .checked_mul(unit_bytes)
                .map(ByteSize)
                .ok_or_else(|| ParseSizeError::TooLarge(text.to_string()));
        }
        if unit_bytes == 1 {
            return Err(ParseSizeError::FractionalBytes(text.to_string()));
        }
        let value: f64 = number.parse().map_err(|_| bad_number())?;
        let bytes = (value * unit_bytes as f64).round();
        // 2^64 is exactly representable; anything at or above it overflows.
        if bytes >= 18_446_744_073_709_551_616.0 {
            return Err(ParseSizeError::TooLarge(text.to_string()));
        }
        Ok(ByteSize(bytes as u64))
    }
}

/// How the backward pass trades memory for recomputation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Policy {
    /// `none`: keep every stage's graph (no recomputation).
    None,
    /// `every:K`: checkpoint the input of every K-th block (K ≥ 1).
    Every(usize),
    /// `sqrt`: `every:⌈√blocks⌉`.
    Sqrt,
    /// `budget:SIZE`: the fastest schedule whose peak fits SIZE bytes.
    Budget(u64),
}

impl Policy {
    /// The schedule of a fixed policy for a chain of `n` scheduled stages whose blocks
    /// begin at `block_starts` (`every:K` and `sqrt` count blocks, not stages); `None`
    /// for `budget:`, which needs the chain's costs and the planner.
    pub fn fixed_schedule(&self, n: usize, block_starts: &[usize]) -> Option<Schedule> {
        match *self {
            Policy::None => Some(Schedule::store_all(n)),
            Policy::Every(k) => Some(Schedule::every_block(n, block_starts, k)),
            Policy::Sqrt => Some(Schedule::sqrt_blocks(n, block_starts)),
            Policy::Budget(_) => None,
        }
    }
}

/// Why a text is not a policy.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParsePolicyError {
    /// Not one of the known policy forms.
    #[error("unknown checkpoint policy `{0}`: expected none, every:K, sqrt or budget:SIZE (e.g. budget:1.5GiB)")]
    Unknown(String),
    /// `every:K` with a K that is not a number.
    #[error("`{0}`: K in every:K must be a whole number ≥ 1")]
    BadEvery(String),
    /// `every:0`.
    #[error("`every:0`: K must be ≥ 1 (every:1 checkpoints every block)")]
    EveryZero,
    /// `budget:SIZE` with a bad size.
    #[error("`{text}`: bad budget: {source}")]
    BadBudget {
        /// The whole policy text.
        text: String,
        /// What is wrong with the size.
        source: ParseSizeError,
    },
}

impl FromStr for Policy {
    type Err = ParsePolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let (name, argument) = match trimmed.split_once(':') {
            Some((name, argument)) => (name.trim(), Some(argument.trim())),
            None => (trimmed, None),
        };
        match (name.to_ascii_lowercase().as_str(), argument) {
            ("none", None) => Ok(Policy::None),
            ("sqrt", None) => Ok(Policy::Sqrt),
            ("every", Some(k)) => match k.parse::<usize>() {
                Ok(0) => Err(ParsePolicyError::EveryZero),
                Ok(k) => Ok(Policy::Every(k)),
                Err(_) => Err(ParsePolicyError::BadEvery(trimmed.to_string())),
            },
            ("budget", Some(size)) => size
                .parse::<ByteSize>()
                .map(|size| Policy::Budget(size.0))
                .map_err(|source| ParsePolicyError::BadBudget {
                    text: trimmed.to_string(),
                    source,
                }),
            _ => Err(ParsePolicyError::Unknown(trimmed.to_string())),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::None => f.write_str("none"),
            Policy::Every(k) => write!(f, "every:{k}"),
            Policy::Sqrt => f.write_str("sqrt"),
            Policy::Budget(bytes) => write!(f, "budget:{}", ByteSize(*bytes).to_exact_string()),
        }
    }
}

impl From<Policy> for String {
    fn from(policy: Policy) -> Self {
        policy.to_string()
    }
}

impl TryFrom<String> for Policy {
    type Error = ParsePolicyError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(text: &str) -> u64 {
        text.parse::<ByteSize>().unwrap().0
    }

    #[test]
    fn sizes_parse_in_both_unit_systems() {
        assert_eq!(size("0"), 0);
        assert_eq!(size("123"), 123);
        assert_eq!(size("123B"), 123);
        assert_eq!(size("2KB"), 2_000);
        assert_eq!(size("2KiB"), 2_048);
        assert_eq!(size("10 MB"), 10_000_000);
        assert_eq!(size("10mib"), 10 << 20);
        assert_eq!(size("1.5GiB"), 3 << 29);
        assert_eq!(size("1.5GB"), 1_500_000_000);
        assert_eq!(size("0.5KiB"), 512);
        assert_eq!(size(".5KiB"), 512);
        assert_eq!(size("2TiB"), 2 << 40);
        assert_eq!(size("18446744073709551615"), u64::MAX);
    }

    #[test]
    fn bad_sizes_are_rejected_with_a_reason() {
        let err = |text: &str| text.parse::<ByteSize>().unwrap_err();
        assert_eq!(err(""), ParseSizeError::Empty);
        assert_eq!(err("12XB"), ParseSizeError::UnknownUnit("XB".into()));
        assert_eq!(err("GiB"), ParseSizeError::BadNumber("GiB".into()));
        assert_eq!(
            err("1.2.3MiB"),
            ParseSizeError::BadNumber("1.2.3MiB".into())
        );
        assert_eq!(err("-1MiB"), ParseSizeError::BadNumber("-1MiB".into()));
        assert_eq!(err("1.5"), ParseSizeError::FractionalBytes("1.5".into()));
        assert_eq!(
            err("18446744073709551616"),
            ParseSizeError::TooLarge("18446744073709551616".into())
        );
        assert_eq!(
            err("17000000TiB"),
            ParseSizeError::TooLarge("17000000TiB".into())
        );
        assert_eq!(
            err("16777216.0TiB"),
            ParseSizeError::TooLarge("16777216.0TiB".into())
        );
        assert!(err("1 2MiB").to_string().contains("unknown size unit"));
    }

    #[test]
    fn sizes_display_for_humans_and_exactly() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(1536).to_string(), "1.5 KiB");
        assert_eq!(ByteSize(512 << 20).to_string(), "512.0 MiB");
        assert_eq!(ByteSize(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(ByteSize(5 << 40).to_string(), "5.0 TiB");
        for (bytes, exact) in [
            (0, "0"),
            (1000, "1KB"),
            (4096, "4KiB"),
            (3 << 29, "1536MiB"),
            (2 << 30, "2GiB"),
            (3_000_000_000, "3GB"),
            (1001, "1001"),
        ] {
            assert_eq!(ByteSize(bytes).to_exact_string(), exact);
            assert_eq!(size(exact), bytes, "{exact}");
        }
    }

    #[test]
    fn policies_round_trip() {
        for (text, policy) in [
            ("none", Policy::None),
            ("sqrt", Policy::Sqrt),
            ("every:1", Policy::Every(1)),
            ("every:12", Policy::Every(12)),
            ("budget:2GiB", Policy::Budget(2 << 30)),
            ("budget:1536MiB", Policy::Budget(3 << 29)),
            ("budget:12345", Policy::Budget(12345)),
        ] {
            assert_eq!(text.parse::<Policy>().unwrap(), policy, "{text}");
            assert_eq!(policy.to_string(), text);
        }
        assert_eq!(
            "budget:1.5GiB".parse::<Policy>().unwrap(),
            Policy::Budget(3 << 29)
        );
        assert_eq!(" Every : 3 ".parse::<Policy>().unwrap(), Policy::Every(3));
        assert_eq!(String::from(Policy::Sqrt), "sqrt");
        assert_eq!(
            Policy::try_from("every:2".to_string()),
            Ok(Policy::Every(2))
        );
    }

    #[test]
    fn bad_policies_are_rejected_with_a_reason() {
        let err = |text: &str| text.parse::<Policy>().unwrap_err();
        assert_eq!(err("every:0"), ParsePolicyError::EveryZero);
        assert!(err("every:0").to_string().contains("K must be ≥ 1"));
        assert_eq!(err("every:x"), ParsePolicyError::BadEvery("every:x".into()));
        assert_eq!(err("every"), ParsePolicyError::Unknown("every".into()));
        assert_eq!(err("sqrt:2"), ParsePolicyError::Unknown("sqrt:2".into()));
        assert_eq!(err("revolve"), ParsePolicyError::Unknown("revolve".into()));
        let budget = err("budget:12XB");
        assert!(
            budget.to_string().contains("unknown size unit `XB`"),
            "{budget}"
        );
        assert!(matches!(
            err("budget:"),
            ParsePolicyError::BadBudget {
                source: ParseSizeError::Empty,
                ..
            }
        ));
    }
}
