//! Deletions batched for DeleteObjects, and the names they still hold (see [`Deletes`]).

use std::collections::{HashMap, HashSet};

/// Deletions waiting to be batched (DeleteObjects takes 1,000 keys), and the names they
/// still hold. A server that keeps a filesystem namespace (SeaweedFS, MinIO) refuses an
/// object `a` beside a prefix `a/` (`ExistingObjectIsFile`), so a deletion that frees a name
/// must reach the server before anything is created under that name: a file replaced by a
/// directory, a directory by a file. Every other deletion waits for its batch.
#[derive(Default)]
pub(super) struct Deletes {
    pub(super) keys: Vec<String>,
    /// Each pending key without its trailing `/` (how many pending keys have that name).
    pub(super) names: HashMap<String, usize>,
    /// Every directory above a pending key (never decremented: a stale entry costs at most
    /// one early batch).
    pub(super) above: HashSet<String>,
}

impl Deletes {
    pub(super) fn add(&mut self, keys: Vec<String>) {
        for k in &keys {
            let name = k.trim_end_matches('/');
            *self.names.entry(name.to_string()).or_default() += 1;
            let mut at = name;
            while let Some(i) = at.rfind('/') {
                at = &at[..i];
                if !self.above.insert(at.to_string()) {
                    break;
                }
            }
        }
        self.keys.extend(keys);
    }

    /// `key` is written again: its deletion is dropped (a PUT replaces it anyway).
    pub(super) fn forget(&mut self, key: &str) {
        let before = self.keys.len();
        self.keys.retain(|k| k != key);
        if self.keys.len() < before {
            let name = key.trim_end_matches('/');
            if let Some(n) = self.names.get_mut(name) {
                *n -= (before - self.keys.len()).min(*n);
                if *n == 0 {
                    self.names.remove(name);
                }
            }
        }
    }

    /// Whether creating `key` needs a pending deletion sent first: one of the same name (a
    /// file where a directory marker was, or the reverse), one of a directory above it (a
    /// file `a` pending while `a/b` is written), or, for an object, one below its name (a
    /// directory's objects pending while a file takes its name).
    pub(super) fn holds(&self, key: &str) -> bool {
        let name = key.trim_end_matches('/');
        if self.names.contains_key(name) || (!key.ends_with('/') && self.above.contains(name)) {
            return true;
        }
        let mut at = name;
        while let Some(i) = at.rfind('/') {
            at = &at[..i];
            if self.names.contains_key(at) {
                return true;
            }
        }
        false
    }
}
