//! One file per subcommand: orchestration only (config, locks, logging, a pass or the loop).

pub mod forget;
pub mod generate;
pub mod monoshot;
pub mod start;
pub mod status;
pub mod stop;
