//! What commands print, and the one rule for when the reader goes away: no write to the
//! terminal or a pipe ever panics. A closed stdout (`syncer status | head -1`) is
//! [`Closed`]: a command that only reports (`status`, `completions`, `manpage`) stops
//! writing and exits 0 without a message, as ripgrep does; a command that acts (`monoshot`,
//! `stop`, `start`) finishes its work and only its output is lost. A closed stderr is ignored.
//! (Rust ignores SIGPIPE, so a closed pipe is an `EPIPE` error here, never a signal.)

use std::fmt;
use std::io::{self, Write};

/// stdout was closed by its reader (or cannot be written): stop writing.
#[derive(Debug)]
pub struct Closed;

/// Writes one line to stdout.
pub fn out(args: fmt::Arguments) -> Result<(), Closed> {
    let mut o = io::stdout().lock();
    o.write_fmt(args)
        .and_then(|()| o.write_all(b"\n"))
        .and_then(|()| o.flush())
        .map_err(|_| Closed)
}

/// Writes bytes to stdout as they are (a generated script or page).
pub fn out_bytes(bytes: &[u8]) -> Result<(), Closed> {
    let mut o = io::stdout().lock();
    o.write_all(bytes)
        .and_then(|()| o.flush())
        .map_err(|_| Closed)
}

/// Writes one line to stderr, `syncer: `-prefixed; a closed stderr is ignored.
pub fn err(args: fmt::Arguments) {
    let _ = writeln!(io::stderr().lock(), "syncer: {args}");
}
