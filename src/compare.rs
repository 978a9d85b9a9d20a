//! The per-entry decision: given what the source and the replica hold at one name, what must
//! happen. Content equality is decided by sha256, taken from the cache when a side's stat
//! token matches the one recorded, read and hashed otherwise. Does no writes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::error::reason;
use crate::fsops::{hash_file, Hint, PIPELINE_MIN};
use crate::model::{Kind, Meta, RelPath};
use crate::plan::{Problem, Reason};
use crate::scan::Ctx;
use crate::state::cache::CachedFile;

/// What to do with a regular file present on both sides.
pub enum FileVerdict {
    /// Content differs: copy (with the source's hash when this pass computed it).
    Copy { reason: Reason, hint: Option<Hint> },
    /// Content equal, metadata differs: fix metadata only.
    Meta(CachedFile),
    /// Nothing to do.
    Same(CachedFile),
    /// A side could not be read; nothing is changed for this entry.
    Error(Problem),
}

/// True when mode, owner (when mirrored) or mtime differ. Symlink modes are not compared.
pub fn meta_differs(src: &Meta, rep: &Meta, owners: bool) -> bool {
    (src.kind != Kind::Symlink && src.perm != rep.perm)
        || src.mtime != rep.mtime
        || (owners && (src.uid != rep.uid || src.gid != rep.gid))
}

pub fn files(
    ctx: &Ctx,
    rel: &RelPath,
    name: &OsStr,
    src: &Meta,
    rep: &Meta,
    cached: Option<&CachedFile>,
) -> FileVerdict {
    // A replica file that no longer has the token syncer recorded was changed by someone else.
    let drifted = cached.is_some_and(|c| c.rep != rep.token);
    let changed = if drifted {
        Reason::Drift
    } else {
        Reason::Update
    };
    if src.size != rep.size {
        return FileVerdict::Copy {
            reason: changed,
            hint: None,
        };
    }
    let src_hit = cached.filter(|c| !ctx.checksum && !c.src_racy && c.src == src.token);
    let rep_hit = cached.filter(|c| !ctx.checksum && c.rep == rep.token);
    // A large file whose source changed while the replica is known: copy it right away,
    // hashing as it is copied, instead of reading it once to hash and again to copy. If
    // the content turns out unchanged, the copy is dropped and only metadata is fixed.
    // Only a token that really changed counts: a racy but equal one just wants a re-hash.
    if let (None, Some(c)) = (src_hit, rep_hit) {
        if src.size >= PIPELINE_MIN && c.src != src.token {
            return FileVerdict::Copy {
                reason: changed,
                hint: Some(Hint::Unless(c.hash, c.rep)),
            };
        }
    }
    let (src_hash, src_token) = match src_hit {
        Some(c) => (c.hash, c.src),
        None => match hash_file(&rel.under(ctx.source), ctx.counters) {
            Ok(v) => v,
            Err(e) => return FileVerdict::Error(read_problem(rel, "source", &e)),
        },
    };
    let (rep_hash, rep_token) = match rep_hit {
        Some(c) => (c.hash, c.rep),
        None => match ctx.replica.hash(rel, ctx.counters) {
            Ok(v) => v,
            Err(e) => return FileVerdict::Error(read_problem(rel, "replica", &e)),
        },
    };
    if src_hash != rep_hash {
        return FileVerdict::Copy {
            reason: changed,
            hint: Some(Hint::Known(src_token, src_hash)),
        };
    }
    let entry = CachedFile {
        name: name.as_bytes().to_vec(),
        src: src_token,
        rep: rep_token,
        hash: src_hash,
        src_racy: src_token.ctime_ns >= ctx.racy_after_ns,
    };
    if meta_differs(src, rep, ctx.replica.chown) {
        FileVerdict::Meta(entry)
    } else {
        FileVerdict::Same(entry)
    }
}

fn read_problem(rel: &RelPath, side: &str, e: &std::io::Error) -> Problem {
    if e.kind() == std::io::ErrorKind::NotFound {
        Problem {
            rel: rel.clone(),
            message: format!("vanished from the {side} during the scan; the next pass takes it"),
            vanished: true,
        }
    } else {
        Problem::error(
            rel,
            format!("could not read {side} file '{rel}': {}", reason(e)),
        )
    }
}
