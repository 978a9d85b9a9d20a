//! Integration tests: the real `syncer` binary on real directories, real daemons and real
//! signals. One test binary; one module per area. Shared helpers live in `common`.

#[path = "cli/cache.rs"]
mod cache;
#[path = "cli/common.rs"]
mod common;
#[path = "cli/daemon.rs"]
mod daemon;
#[path = "cli/engine.rs"]
mod engine;
#[path = "cli/faults.rs"]
mod faults;
#[path = "cli/hygiene.rs"]
mod hygiene;
#[path = "cli/metadata.rs"]
mod metadata;
#[path = "cli/moves.rs"]
mod moves;
#[path = "cli/s3.rs"]
mod s3;
#[path = "cli/safety.rs"]
mod safety;
#[path = "cli/security.rs"]
mod security;
#[path = "cli/state.rs"]
mod state;
#[path = "cli/watch.rs"]
mod watch;
