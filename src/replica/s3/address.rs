//! Where a bucket replica lives (`s3://BUCKET/PREFIX`, parsed once) and how to reach it:
//! the endpoint, the region and `--timeout`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// Where a replica lives: `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl Target {
    /// `None` when `text` is not an `s3://` address; `Err` names what is wrong with one.
    pub fn parse(text: &OsStr) -> Option<Result<Target, String>> {
        let rest = text.as_bytes().strip_prefix(b"s3://")?;
        let Ok(rest) = std::str::from_utf8(rest) else {
            return Some(Err("an s3:// address must be UTF-8".into()));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Some(Err(format!("'s3://{rest}' names no bucket")));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
            && !prefix.is_empty()
        {
            return Some(Err(format!(
                "'s3://{rest}': an empty, '.' or '..' component in the prefix"
            )));
        }
        Some(Ok(Target {
            bucket: bucket.to_string(),
            prefix,
        }))
    }

    pub fn url(&self) -> String {
        match self.prefix.is_empty() {
            true => format!("s3://{}", self.bucket),
            false => format!("s3://{}/{}", self.bucket, self.prefix),
        }
    }
}

/// How to reach the object store (from `--s3-endpoint`/`AWS_ENDPOINT_URL` and
/// `--s3-region`/`AWS_REGION`); credentials come from the standard AWS environment variables
/// and the shared credentials file, never from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `--timeout`: an attempt that makes no progress for this long is abandoned (and
    /// retried); one request with its retries never takes longer than three times this.
    pub timeout: Duration,
}

impl Default for Endpoint {
    fn default() -> Endpoint {
        Endpoint {
            endpoint: None,
            region: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// `--timeout`'s default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl Endpoint {
    /// `--s3-region`, else `AWS_REGION`, else us-east-1.
    pub(super) fn region_name(&self) -> String {
        self.region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
            .unwrap_or_else(|| "us-east-1".to_string())
    }

    /// `--s3-endpoint`, else `AWS_ENDPOINT_URL`: a bucket there is addressed path-style;
    /// without one, AWS's virtual-host style is used.
    pub(super) fn given(&self) -> Option<String> {
        self.endpoint.clone().or_else(|| {
            std::env::var("AWS_ENDPOINT_URL")
                .ok()
                .filter(|r| !r.is_empty())
        })
    }

    /// The endpoint's URL, as errors name it.
    pub(super) fn url(&self) -> String {
        self.given()
            .unwrap_or_else(|| "https://s3.amazonaws.com".to_string())
    }
}
