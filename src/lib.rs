//! syncer: keeps a replica directory an exact, safe, one-way mirror of a source directory.
//!
//! A pass is a pipeline: `config` (validated options) → `scan` (parallel merge-walk, with
//! `compare` deciding each entry) → `plan` (actions and the deletion guard; hard links and
//! `moves` are resolved over the whole plan) → `apply` (ordered, parallel execution) →
//! commit (`state::cache`). The source is read through `source`, the replica reached only
//! through the `replica::Replica` interface; both local trees are anchored on a directory
//! handle (`anchor`), so no symlink can redirect a pass.
//! `pass` runs one; `commands` and `daemon` decide when, with what `job` shares.

pub mod anchor;
pub mod apply;
pub mod cancel;
pub mod cli;
pub mod commands;
pub mod compare;
pub mod config;
pub mod daemon;
pub mod error;
pub mod job;
pub mod journal;
pub mod model;
pub mod moves;
pub mod pass;
#[cfg(test)]
mod pipeline_tests;
pub mod plan;
pub mod replica;
pub mod scan;
pub mod source;
pub mod spill;
pub mod state;
pub mod term;
pub mod watch;
