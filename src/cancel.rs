//! Cooperative cancellation: SIGTERM/SIGINT set one flag; scan, hashing and copy loops check
//! it between chunks and stop, dropping (never renaming) any temp file in flight; a request
//! to a remote replica is dropped within 50 ms. What the process is waiting on at a given
//! moment ([`doing`]) is kept too, so that a `stop` that waited in vain can say what the
//! daemon is stuck on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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

/// What the process waits on (one of its threads, the latest to start waiting), since when.
static DOING: Mutex<Option<(String, SystemTime)>> = Mutex::new(None);

/// Marks the start of a wait that SIGTERM may have to interrupt; it ends when the guard is
/// dropped.
pub fn doing(what: String) -> Doing {
    if let Ok(mut d) = DOING.lock() {
        *d = Some((what, SystemTime::now()));
    }
    Doing
}

pub struct Doing;

impl Drop for Doing {
    fn drop(&mut self) {
        if let Ok(mut d) = DOING.lock() {
            *d = None;
        }
    }
}

/// What the process is waiting on, in words with the time it started (`None`: nothing
/// that `doing` marked).
pub fn current() -> Option<String> {
    let d = DOING.lock().ok()?;
    let (what, since) = d.as_ref()?;
    Some(format!(
        "{what} (since {})",
        humantime::format_rfc3339_seconds(*since)
    ))
}
