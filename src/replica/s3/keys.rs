//! The key codec: a path's names as S3 keys and back, reversibly (see the module notes of
//! `replica::s3` for the escapes).

use crate::model::Kind;

use super::{DIRS_OBJECT, LINK_SUFFIX};

/// Escapes one name for a key (see the module's notes).
pub fn escape(name: &[u8], kind: Kind, at_root: bool) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' || c.is_control() {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    let reserved =
        out.ends_with(LINK_SUFFIX) || (at_root && out == DIRS_OBJECT) || out == "." || out == "..";
    if kind != Kind::Symlink && reserved {
        // The last '.' (there is one in each reserved name) becomes %2E.
        let at = out.rfind('.').expect("a reserved name has a dot");
        out.replace_range(at..at + 1, "%2E");
    }
    if kind == Kind::Symlink {
        out.push_str(LINK_SUFFIX);
    }
    out
}

/// Decodes one key component: the name's bytes and whether it is a symlink object.
pub fn unescape(segment: &str) -> (Vec<u8>, bool) {
    let (body, link) = match segment.strip_suffix(LINK_SUFFIX) {
        Some(b) if !b.is_empty() => (b, true),
        _ => (segment, false),
    };
    let bytes = body.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    (out, link)
}

/// A relative path as escaped text, name by name (the directory object's keys).
pub(super) fn escape_path(bytes: &[u8]) -> String {
    bytes
        .split(|b| *b == b'/')
        .map(|p| escape(p, Kind::Dir, false))
        .collect::<Vec<_>>()
        .join("/")
}

/// The reverse of [`escape_path`].
pub(super) fn unescape_path(text: &str) -> Vec<u8> {
    let parts: Vec<Vec<u8>> = text.split('/').map(|p| unescape(p).0).collect();
    parts.join(&b'/')
}
