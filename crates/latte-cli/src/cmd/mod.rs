//! One module per subcommand, each with `Args` and `run`.

pub mod bench;
pub mod encode;
pub mod forward;
pub mod inspect;
pub mod merge_lora;
pub mod model_source;
pub mod plan;
pub mod plan_support;
pub mod profile;
pub mod sample;
pub mod train;
pub mod video_out;
