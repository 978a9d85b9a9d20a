//! syncer: keeps a replica directory an exact, safe, one-way mirror of a source directory.
//!
//! A pass is a pipeline: `config` (validated options) → `scan` (parallel merge-walk, with
//! `compare` deciding each entry) → `plan` (actions and the deletion guard) → `apply`
//! (ordered, parallel execution through `fsops`, the only writer to the replica) → commit
//! (`state::cache`). `pass` runs one; `commands` and `daemon` decide when.

pub mod apply;
pub mod cancel;
pub mod cli;
pub mod commands;
pub mod compare;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fsops;
pub mod journal;
pub mod model;
pub mod pass;
pub mod plan;
pub mod scan;
pub mod state;
