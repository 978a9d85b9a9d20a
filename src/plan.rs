//! A pass's plan: the ordered list of actions that converge the replica, the counts the
//! deletion guard needs, and the cache records to rewrite. Pure data and pure checks, no I/O:
//! the scan builds a `Plan`, `guard` decides whether it may run, `apply` executes it.

use std::path::PathBuf;

use crate::error::EntryError;
use crate::model::{Hint, Kind, Meta, RelPath, Version};

/// Why a file is copied; also the word written to the file-I/O log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not in the replica yet (`CREATE`).
    Create,
    /// Different content in the source (`UPDATE`).
    Update,
    /// The replica file was changed behind syncer's back (`DRIFT`).
    Drift,
}

impl Reason {
    pub fn word(self) -> &'static str {
        match self {
            Reason::Create => "CREATE",
            Reason::Update => "UPDATE",
            Reason::Drift => "DRIFT",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Op {
    /// Remove a replica entry (a directory with everything below it, `entries` in all).
    Delete { kind: Kind, entries: u64 },
    /// Create a directory (private until its `DirMeta` runs).
    Mkdir,
    /// Copy a source file over. `hint` is what this pass already knows of its content
    /// (see `model::Hint`); `size` is the scanned size (for progress).
    Copy {
        reason: Reason,
        size: u64,
        hint: Option<Box<Hint>>,
        /// A replica file exists at this path and is overwritten (backed up first).
        overwrites: bool,
    },
    /// Create or retarget a symlink.
    Link(Box<LinkSpec>),
    /// Fix mode, owner and times of a file or symlink whose content is already equal.
    /// `rep` is the replica file's version that equality was established for: a file that
    /// no longer has it is left for the next pass.
    Meta {
        meta: Box<Meta>,
        rep: Option<Box<Version>>,
    },
    /// Set a directory's mode, owner and times, after everything below it.
    DirMeta { meta: Box<Meta> },
}

/// A symlink to create: boxed in `Op` because links are rare and `Op` is held per change.
#[derive(Clone, Debug)]
pub struct LinkSpec {
    pub reason: Reason,
    pub target: PathBuf,
    pub meta: Meta,
}

#[derive(Clone, Debug)]
pub struct Action {
    pub rel: RelPath,
    pub op: Op,
}

#[derive(Debug, Default)]
pub struct Plan {
    /// Actions in scan order (parents before children, names sorted by bytes).
    pub actions: Vec<Action>,
    /// Entries the scan could not read (each reported once, exit code 1 or a skip).
    pub problems: Vec<EntryError>,
    /// Leftover `.syncer-*.tmp` files of an interrupted pass, removed first by apply.
    pub stale_temps: Vec<RelPath>,
    /// Entries the replica holds now, outside excluded and unknown subtrees.
    pub replica_entries: u64,
    /// Entries the plan creates in the replica.
    pub creates: u64,
    /// Entries the plan deletes from the replica (each entry of a deleted tree counts).
    pub deletes: u64,
    /// Special files (fifos, sockets, devices) skipped.
    pub specials: u64,
}

impl Plan {
    pub fn merge(mut self, other: Plan) -> Plan {
        self.actions.extend(other.actions);
        self.problems.extend(other.problems);
        self.stale_temps.extend(other.stale_temps);
        self.replica_entries += other.replica_entries;
        self.creates += other.creates;
        self.deletes += other.deletes;
        self.specials += other.specials;
        self
    }

    /// True when the plan changes nothing in the replica.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.stale_temps.is_empty()
    }
}

/// The deletion guard (`--max-delete`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Guard {
    /// Refuse a pass that would leave a replica of at least 100 entries with fewer than half.
    Default,
    /// Refuse a pass that deletes more than this many entries.
    Count(u64),
    /// Refuse a pass that deletes more than this percentage of the replica's entries.
    Percent(f64),
    /// No guard.
    Off,
}

/// Smallest replica the default guard protects: below it, emptying the replica is allowed.
pub const GUARD_MIN_ENTRIES: u64 = 100;

impl Guard {
    pub fn parse(text: &str) -> Result<Guard, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(Guard::Off);
        }
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(v) if (0.0..=100.0).contains(&v) => Ok(Guard::Percent(v)),
                _ => Err(format!(
                    "--max-delete: '{text}' is not a percentage from 0% to 100%"
                )),
            };
        }
        t.parse::<u64>().map(Guard::Count).map_err(|_| {
            format!("--max-delete: '{text}' is not a count, a percentage (10%) or 'none'")
        })
    }

    /// Checks the whole plan before anything is changed; `Err` is the reason for refusing.
    pub fn check(self, plan: &Plan) -> Result<(), String> {
        let (have, del, add) = (plan.replica_entries, plan.deletes, plan.creates);
        match self {
            Guard::Off => Ok(()),
            Guard::Default => {
                let left = have.saturating_sub(del) + add;
                if have >= GUARD_MIN_ENTRIES && left * 2 < have {
                    Err(format!(
                        "refusing to delete {del} of the replica's {have} entries: it would keep only {left} \
                         (fewer than half; is the source mounted?); run with --max-delete none to allow it"
                    ))
                } else {
                    Ok(())
                }
            }
            Guard::Count(max) => {
                if del > max {
                    Err(format!(
                        "refusing to delete {del} entries: more than --max-delete {max}; raise it or use --max-delete none"
                    ))
                } else {
                    Ok(())
                }
            }
            Guard::Percent(p) => {
                let limit = (have as f64) * p / 100.0;
                if del as f64 > limit {
                    Err(format!(
                        "refusing to delete {del} of the replica's {have} entries: more than --max-delete {p}%; \
                         raise it or use --max-delete none"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(have: u64, del: u64, add: u64) -> Plan {
        Plan {
            replica_entries: have,
            deletes: del,
            creates: add,
            ..Plan::default()
        }
    }

    #[test]
    fn default_guard_refuses_emptying_a_large_replica() {
        assert!(Guard::Default.check(&plan(100, 100, 0)).is_err());
        assert!(Guard::Default.check(&plan(1000, 501, 0)).is_err());
    }

    #[test]
    fn default_guard_allows_small_replicas_and_renames() {
        assert!(Guard::Default.check(&plan(99, 99, 0)).is_ok());
        assert!(Guard::Default.check(&plan(1000, 900, 900)).is_ok());
        assert!(Guard::Default.check(&plan(1000, 500, 0)).is_ok());
    }

    #[test]
    fn count_and_percent_guards_count_deletions_only() {
        assert!(Guard::Count(10).check(&plan(1000, 11, 11)).is_err());
        assert!(Guard::Count(10).check(&plan(1000, 10, 0)).is_ok());
        assert!(Guard::Percent(10.0).check(&plan(1000, 101, 500)).is_err());
        assert!(Guard::Percent(10.0).check(&plan(1000, 100, 0)).is_ok());
    }

    #[test]
    fn parses_guard_options() {
        assert_eq!(Guard::parse("none"), Ok(Guard::Off));
        assert_eq!(Guard::parse("25"), Ok(Guard::Count(25)));
        assert_eq!(Guard::parse("10%"), Ok(Guard::Percent(10.0)));
        assert!(Guard::parse("ten").is_err());
        assert!(Guard::parse("150%").is_err());
    }
}
