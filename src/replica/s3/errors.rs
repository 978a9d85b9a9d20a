//! What a failure of the object store looks like to a person: OpenDAL's errors turned into one
//! line in words (what is wrong and where to look, the server's own code and message),
//! never the request's headers or a debug dump; and the error of a request abandoned for
//! SIGTERM.

use std::io;

use super::Target;

pub(super) fn other(e: &opendal::Error) -> io::Error {
    let kind = match e.kind() {
        opendal::ErrorKind::NotFound => io::ErrorKind::NotFound,
        opendal::ErrorKind::PermissionDenied => io::ErrorKind::PermissionDenied,
        opendal::ErrorKind::Unsupported => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, one_line(e))
}

/// The error of a request abandoned for SIGTERM. Not `ErrorKind::Interrupted`, which means
/// "try again" to `write_all` and every other std loop.
pub(super) fn interrupted() -> io::Error {
    io::Error::other("interrupted")
}

/// Whether OpenDAL's timeout layer gave up on an attempt.
pub(super) fn is_timeout(e: &opendal::Error) -> bool {
    e.message().contains("timeout reached")
}

/// An error from the server as one line a person can act on (what is wrong and where to
/// look), with the `io::ErrorKind` that fits it. Never the request's headers.
pub(super) fn describe(e: &opendal::Error, target: &Target, url: &str) -> io::Error {
    use io::ErrorKind as K;
    let debug = format!("{e:?}");
    let has = |key: &str| debug.contains(key);
    let bucket = format!("s3://{}", target.bucket);
    let (kind, text) = if has("SignatureDoesNotMatch") {
        (
            K::PermissionDenied,
            format!(
                "access denied to {bucket} (SignatureDoesNotMatch: check AWS_SECRET_ACCESS_KEY)"
            ),
        )
    } else if has("InvalidAccessKeyId") {
        (
            K::PermissionDenied,
            format!("access denied to {bucket} (InvalidAccessKeyId: check AWS_ACCESS_KEY_ID)"),
        )
    } else if has("NoSuchBucket") {
        (
            K::NotFound,
            format!("bucket '{}' does not exist at {url}", target.bucket),
        )
    } else if has("no valid credential") || has("credential not found") {
        (
            K::PermissionDenied,
            "no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials)"
                .to_string(),
        )
    } else if has("AccessDenied") {
        (
            K::PermissionDenied,
            format!("access denied to {} (AccessDenied)", target.url()),
        )
    } else if has("onnection refused") {
        (
            K::ConnectionRefused,
            format!("could not connect to {url} (connection refused)"),
        )
    } else if has("dns error") {
        (
            K::NotFound,
            format!("could not resolve the host of {url} (a DNS failure)"),
        )
    } else {
        return other(e);
    };
    io::Error::new(kind, text)
}

/// The code and message of the server's own error, out of the `S3Error { code: "…",
/// message: "…", … }` OpenDAL reports (never shown as it is: a person reads the words).
pub(super) fn s3_error(text: &str) -> Option<(&str, &str)> {
    let field = |name: &str| {
        let at = text.find(&format!("{name}: \""))? + name.len() + 3;
        let len = text[at..].find('"')?;
        Some(&text[at..at + len])
    };
    text.starts_with("S3Error")
        .then(|| Some((field("code")?, field("message")?)))
        .flatten()
}

/// An OpenDAL error on one line, without the request's headers (which could carry
/// credentials or signatures).
pub fn one_line(e: &opendal::Error) -> String {
    let first = e.message().lines().next().unwrap_or("").trim();
    let mut line = match s3_error(first) {
        Some((code, message)) => format!("{code}: {message}"),
        None => format!("{}: {first}", e.kind()),
    };
    // The innermost cause says what really happened (connection refused, a DNS failure).
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(c) = cause {
        let text = c.to_string();
        let first = text.lines().next().unwrap_or("");
        // "(os error N)" is noise here, and `error::reason` would cut the line at it.
        last = Some(
            first
                .split(" (os error")
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        );
        cause = c.source();
    }
    if let Some(c) = last.filter(|c| !line.contains(c.as_str())) {
        line.push_str(&format!(" ({c})"));
    }
    let debug = format!("{e:?}");
    for key in [
        "NoSuchBucket",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
    ] {
        if debug.contains(key) && !line.contains(key) {
            line.push_str(&format!(" ({key})"));
        }
    }
    line
}
