//! Multipart uploads a killed process left behind in the bucket. Until it is aborted, an
//! unfinished upload's parts are stored and billed; a failed or interrupted upload is aborted
//! on the spot (`S3Replica::upload`), but a process killed with `kill -9` aborts nothing.
//!
//! So each multipart upload is journaled in the job's S3 index (table `uploads`: key →
//! when it began, Unix milliseconds), durably before it begins, and struck out when it is
//! complete or aborted. A record that outlives its process is the trace of an unfinished
//! upload: the next real pass ([`sweep`], when the replica is opened) lists the multipart
//! uploads of each recorded key (`GET /?uploads&prefix=KEY`), aborts those initiated before
//! the pass began (`DELETE /KEY?uploadId=ID`), and forgets the records. The journal is what
//! keeps this cheap: without a record, a pass sends no request at all for it.
//!
//! OpenDAL 0.59.5 has no call to list multipart uploads or to abort one by its id, so these
//! two requests are built here, signed by the SigV4 signer and credential chain OpenDAL's S3
//! service is built on (reqsign, set up as that service sets it up, without the EC2 metadata
//! service: syncer talks to no host but the endpoint), sent with reqwest on the replica's
//! runtime (bounded by `--timeout`, dropped on SIGTERM) and read with quick-xml. A failure
//! here is a warning, never a failed pass: the records stay, and the next pass tries again.
//!
//! It does not look for uploads nobody recorded (another client's, or older than the
//! journal): a lifecycle rule (`AbortIncompleteMultipartUpload`) is the tool for those. A
//! record left in an index that has since been taken over by another replica address is
//! looked up under this replica's prefix: it costs a listing, never an abort outside it.

use std::io;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableTable, TableDefinition};
use reqsign_aws_v4::{Credential, DefaultCredentialProvider, RequestSigner};
use reqsign_core::{Context, OsEnv, Signer};
use reqsign_file_read_tokio::TokioFileRead;
use serde::Deserialize;

use super::{Endpoint, S3Replica, Target};

/// Multipart uploads in progress: key (below the replica's prefix) → when it began (Unix ms).
const UPLOADS: TableDefinition<&str, u64> = TableDefinition::new("uploads");

/// Records, durably, that a multipart upload of `key` begins. A failure is a warning: the
/// upload goes on, and only a `kill -9` during it would leave its parts unnoticed.
pub(super) fn begin(db: &redb::Database, key: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if let Err(e) = change(db, |t| t.insert(key, now).map(drop)) {
        log::warn!("could not record the upload of '{key}' in the index: {e}");
    }
}

/// Strikes out the record of `key`'s upload (complete, or aborted).
pub(super) fn end(db: &redb::Database, key: &str) {
    if let Err(e) = change(db, |t| t.remove(key).map(drop)) {
        log::warn!("could not update the index after the upload of '{key}': {e}");
    }
}

#[allow(clippy::result_large_err)] // redb's own error, shown once by the caller
fn change(
    db: &redb::Database,
    f: impl FnOnce(&mut redb::Table<&str, u64>) -> Result<(), redb::StorageError>,
) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut t = txn.open_table(UPLOADS)?;
        f(&mut t)?;
    }
    txn.commit()?;
    Ok(())
}

/// The keys whose uploads were recorded and never struck out, sorted.
#[allow(clippy::result_large_err)] // redb's own error, shown once by the caller
fn recorded(db: &redb::Database) -> Result<Vec<String>, redb::Error> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(UPLOADS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut keys = Vec::new();
    for row in table.iter()? {
        keys.push(row?.0.value().to_string());
    }
    Ok(keys)
}

/// Forgets the records of `keys` (their leftovers are gone).
fn forget(db: &redb::Database, keys: &[String]) {
    let result = change(db, |t| {
        for k in keys {
            t.remove(k.as_str())?;
        }
        Ok(())
    });
    if let Err(e) = result {
        log::warn!("could not update the index after aborting unfinished uploads: {e}");
    }
}

/// Aborts the multipart uploads that a process killed mid-upload left under the replica
/// (see the module's notes). `started`: when this pass began; an upload initiated later is
/// not a leftover, and its record stays for the next pass. Never fails the pass: a problem
/// is a warning, and the records stay.
pub(super) fn sweep(
    rep: &S3Replica,
    db: &redb::Database,
    target: &Target,
    endpoint: &Endpoint,
    started: SystemTime,
) {
    let keys = match recorded(db) {
        Ok(keys) if keys.is_empty() => return,
        Ok(keys) => keys,
        Err(e) => {
            log::warn!("could not read the index of '{}': {e}", target.url());
            return;
        }
    };
    let mut done = Vec::new();
    let mut aborted = 0;
    let outcome = Client::new(target, endpoint).and_then(|client| {
        for key in &keys {
            let (n, newer) = sweep_key(rep, &client, key, started)?;
            aborted += n;
            if !newer {
                done.push(key.clone());
            }
        }
        Ok(())
    });
    forget(db, &done);
    if aborted > 0 {
        log::info!(
            "aborted {aborted} unfinished upload{} that an interrupted run left under '{}'",
            if aborted == 1 { "" } else { "s" },
            target.url()
        );
    }
    if let Err(e) = outcome {
        log::warn!(
            "could not abort the unfinished uploads an interrupted run left under '{}' ({e}); the next pass tries again",
            target.url()
        );
    }
}

/// Aborts the uploads of one key initiated before `started`: how many, and whether one
/// initiated since was seen (kept, and its record with it).
fn sweep_key(
    rep: &S3Replica,
    client: &Client,
    key: &str,
    started: SystemTime,
) -> io::Result<(usize, bool)> {
    let mut marker: Option<(String, String)> = None;
    let mut old = Vec::new();
    let mut newer = false;
    loop {
        rep.requests.list.fetch_add(1, Ordering::Relaxed);
        let page = rep
            .run_own(client.list(key, marker.as_ref()))?
            .map_err(io::Error::other)?;
        for u in page
            .upload
            .into_iter()
            .filter(|u| u.key == client.full(key))
        {
            // A time the server wrote in a form not understood is taken for an old one:
            // the key is this replica's and was recorded as left unfinished.
            match humantime::parse_rfc3339_weak(u.initiated.trim()) {
                Ok(t) if t >= started => newer = true,
                _ => old.push(u.upload_id),
            }
        }
        let next = (page.next_key_marker, page.next_upload_id_marker);
        if !page.is_truncated || marker.as_ref() == Some(&next) || next.0.is_empty() {
            break;
        }
        marker = Some(next);
    }
    for id in &old {
        rep.requests.delete.fetch_add(1, Ordering::Relaxed);
        rep.run_own(client.abort(key, id))?
            .map_err(io::Error::other)?;
    }
    Ok((old.len(), newer))
}

/// One page of a ListMultipartUploads answer (the fields used).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct Page {
    is_truncated: bool,
    next_key_marker: String,
    next_upload_id_marker: String,
    upload: Vec<Unfinished>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct Unfinished {
    key: String,
    upload_id: String,
    initiated: String,
}

/// An S3 error document.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct ErrorDoc {
    code: String,
    message: String,
}

/// Sends the two requests, signed, to the bucket.
struct Client {
    http: reqwest::Client,
    signer: Signer<Credential>,
    /// The bucket's URL, without a trailing `/`.
    bucket: String,
    /// The replica's prefix with a trailing `/` (empty at the bucket's root).
    root: String,
}

impl Client {
    fn new(target: &Target, endpoint: &Endpoint) -> io::Result<Client> {
        let region = endpoint.region_name();
        // OpenDAL's S3 service reads these when syncer names no endpoint.
        let env = ["AWS_ENDPOINT", "AWS_S3_ENDPOINT"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|e| !e.is_empty()));
        let bucket = bucket_url(&target.bucket, endpoint.given(), env, &region);
        // As OpenDAL's S3 service builds its signer (`S3Builder::build`): the default
        // credential chain without the EC2 metadata service, and SigV4 for "s3" in the
        // region. OpenDAL adds its HTTP transport to the context when it signs; this one
        // has none, so the sources fetched over HTTP (SSO, web identity, ECS) fail here,
        // and with them this clean-up, with a warning: it never reaches a credentials host.
        let ctx = Context::new().with_file_read(TokioFileRead).with_env(OsEnv);
        let provider = DefaultCredentialProvider::builder().no_imds().build();
        let signer = Signer::new(ctx, provider, RequestSigner::new("s3", &region));
        // No redirect: a request goes to the endpoint and nowhere else.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| io::Error::other(chain(&e)))?;
        let root = match target.prefix.is_empty() {
            true => String::new(),
            false => format!("{}/", target.prefix),
        };
        Ok(Client {
            http,
            signer,
            bucket,
            root,
        })
    }

    /// `key`'s full key in the bucket.
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.root)
    }

    /// ListMultipartUploads of the uploads whose key begins with `key`, from `marker`.
    async fn list(&self, key: &str, marker: Option<&(String, String)>) -> Result<Page, String> {
        let mut url = format!("{}/?uploads&prefix={}", self.bucket, enc(&self.full(key)));
        if let Some((k, id)) = marker {
            url.push_str(&format!(
                "&key-marker={}&upload-id-marker={}",
                enc(k),
                enc(id)
            ));
        }
        let body = self.send(http::Method::GET, &url).await?;
        quick_xml::de::from_reader(body.as_slice())
            .map_err(|e| format!("could not read the list of multipart uploads: {e}"))
    }

    /// AbortMultipartUpload. An upload already gone counts as aborted.
    async fn abort(&self, key: &str, id: &str) -> Result<(), String> {
        let url = format!(
            "{}/{}?uploadId={}",
            self.bucket,
            enc(&self.full(key)),
            enc(id)
        );
        match self.send(http::Method::DELETE, &url).await {
            Err(e) if e.starts_with("NoSuchUpload") => Ok(()),
            other => other.map(drop),
        }
    }

    /// Signs and sends a request with no body; the body of a 2xx answer, or the server's
    /// error as `Code: message`.
    async fn send(&self, method: http::Method, url: &str) -> Result<Vec<u8>, String> {
        let (mut parts, ()) = http::Request::builder()
            .method(method)
            .uri(url)
            .body(())
            .map_err(|e| format!("invalid request URL {url}: {e}"))?
            .into_parts();
        self.signer
            .sign(&mut parts, None)
            .await
            .map_err(|e| format!("could not sign the request: {e}"))?;
        // reqwest sets the Host header itself (as OpenDAL lets it).
        parts.headers.remove(http::header::HOST);
        let request = reqwest::Request::try_from(http::Request::from_parts(parts, Vec::new()))
            .map_err(|e| chain(&e))?;
        let answer = self.http.execute(request).await.map_err(|e| chain(&e))?;
        let status = answer.status();
        let body = answer.bytes().await.map_err(|e| chain(&e))?;
        if status.is_success() {
            return Ok(body.to_vec());
        }
        let doc: ErrorDoc = quick_xml::de::from_reader(&body[..]).unwrap_or_default();
        Err(match doc.code.is_empty() {
            true => format!("HTTP {status}"),
            false => format!("{}: {}", doc.code, doc.message),
        })
    }
}

/// Percent-encodes a key or a query value as OpenDAL encodes paths (`/` kept).
fn enc(text: &str) -> String {
    opendal::raw::percent_encode_path(text)
}

/// An error with its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(&format!(": {text}"));
        }
        cause = c.source();
    }
    line
}

/// The bucket's URL, as OpenDAL's S3 service makes it (`S3Builder::build_endpoint`):
/// `given` (`--s3-endpoint`/`AWS_ENDPOINT_URL`) is addressed path-style, as `build_operator`
/// asks; without it, `env` (`AWS_ENDPOINT`, `AWS_S3_ENDPOINT`) or AWS's regional endpoint,
/// virtual-host style.
fn bucket_url(bucket: &str, given: Option<String>, env: Option<String>, region: &str) -> String {
    let path_style = given.is_some();
    let mut url = match given.or(env.map(|e| e.trim_end_matches('/').to_string())) {
        Some(e) if e.starts_with("http") => e,
        Some(e) => format!("https://{e}"),
        None => "https://s3.amazonaws.com".to_string(),
    };
    url = url.replace(&format!("//{bucket}."), "//");
    if let Ok(parsed) = reqwest::Url::parse(&url) {
        url = parsed.to_string().trim_end_matches('/').to_string();
    }
    if url == "https://s3.amazonaws.com" {
        url = format!("https://s3.{region}.amazonaws.com");
    }
    match path_style {
        true => format!("{url}/{bucket}"),
        false => url.replacen("//", &format!("//{bucket}."), 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn db() -> (tempfile::TempDir, redb::Database) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = redb::Database::create(dir.path().join("i.redb")).expect("db");
        (dir, db)
    }

    #[test]
    fn an_upload_is_recorded_until_it_ends() {
        let (_dir, db) = db();
        assert!(recorded(&db).expect("read").is_empty(), "no table yet");
        begin(&db, "a/big.bin");
        begin(&db, "z.iso");
        begin(&db, "m");
        end(&db, "z.iso");
        assert_eq!(recorded(&db).expect("read"), ["a/big.bin", "m"]);
        forget(&db, &["m".to_string()]);
        assert_eq!(recorded(&db).expect("read"), ["a/big.bin"]);
        end(&db, "a/big.bin");
        assert!(recorded(&db).expect("read").is_empty());
    }

    #[test]
    fn the_bucket_is_addressed_as_opendal_addresses_it() {
        let path = |e: &str| bucket_url("b", Some(e.to_string()), None, "eu-west-1");
        assert_eq!(path("http://127.0.0.1:8333"), "http://127.0.0.1:8333/b");
        assert_eq!(path("http://127.0.0.1:8333/"), "http://127.0.0.1:8333/b");
        assert_eq!(path("minio.example:9000"), "https://minio.example:9000/b");
        assert_eq!(
            path("https://s3.amazonaws.com"),
            "https://s3.eu-west-1.amazonaws.com/b"
        );
        assert_eq!(
            bucket_url("b", None, None, "eu-west-1"),
            "https://b.s3.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            bucket_url("b", None, Some("https://b.s3.example.com/".into()), "x"),
            "https://b.s3.example.com"
        );
    }

    #[test]
    fn a_list_of_multipart_uploads_is_read_page_by_page() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>mirror</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>p/big.bin</NextKeyMarker><NextUploadIdMarker>id2</NextUploadIdMarker>
  <Prefix>p/big.bin</Prefix><MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>p/big.bin</Key><UploadId>id1</UploadId>
    <Initiator><ID>x</ID></Initiator><StorageClass>STANDARD</StorageClass>
    <Initiated>2026-11-03T10:00:00.000Z</Initiated></Upload>
  <Upload><Key>p/big.bin2</Key><UploadId>id2</UploadId>
    <Initiated>2026-11-03T10:00:01Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page: Page = quick_xml::de::from_str(xml).expect("parse");
        assert!(page.is_truncated);
        assert_eq!(
            (
                page.next_key_marker.as_str(),
                page.next_upload_id_marker.as_str()
            ),
            ("p/big.bin", "id2")
        );
        let ids: Vec<_> = page.upload.iter().map(|u| u.upload_id.as_str()).collect();
        assert_eq!(ids, ["id1", "id2"]);
        let t = humantime::parse_rfc3339_weak(&page.upload[0].initiated).expect("time");
        assert_eq!(t, UNIX_EPOCH + Duration::from_secs(1_793_700_000));
        let empty: Page = quick_xml::de::from_str(
            "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
        )
        .expect("parse");
        assert!(empty.upload.is_empty() && !empty.is_truncated);
    }

    #[test]
    fn keys_and_ids_are_encoded_once() {
        assert_eq!(enc("p/a b%25/caf\u{e9}"), "p/a%20b%2525/caf%C3%A9");
        assert_eq!(enc("2~x+y=z"), "2~x%2By%3Dz");
    }
}
