//! Cooperative cancellation: SIGTERM/SIGINT set one flag; scan, hashing and copy loops check
//! it between chunks and stop, dropping (never renaming) any temp file in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// The shared flag, to hand to signal handlers.
pub fn flag() -> Arc<AtomicBool> {
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// Registers SIGTERM and SIGINT to request cancellation instead of killing the process.
pub fn on_signals() -> std::io::Result<()> {
    let f = flag();
    signal_hook::flag::register(signal_hook::consts::SIGTERM, f.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, f)?;
    Ok(())
}
