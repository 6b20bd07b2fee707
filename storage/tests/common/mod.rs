//! Test fixtures of the storage conformance suite: one `Fixture` per backend (memory, local temp
//! dir, S3 from `scripts/s3_server.sh`), and `FaultStore`, an object_store layer that records
//! writes/deletes and injects failures or delays.
//!
//! Not tests themselves (see `conformance.rs`). S3 fixtures exist only when the environment of
//! `scripts/s3_server.sh start` is present; with `MLA_REQUIRE_S3=1` a missing environment fails.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use mla_storage::object_store::path::Path;
use mla_storage::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use mla_storage::{Bytes, CheckpointStore, ManifestMeta, StepName, StoreOptions};

/// Is the S3 test environment present? Panics when it is required but missing.
pub fn s3_env() -> Option<String> {
    let bucket = std::env::var("MLA_TEST_S3_BUCKET").ok();
    let endpoint = std::env::var("AWS_ENDPOINT_URL").ok();
    match (bucket, endpoint) {
        (Some(b), Some(_)) => Some(b),
        _ if std::env::var("MLA_REQUIRE_S3").as_deref() == Ok("1") => panic!(
            "MLA_REQUIRE_S3=1 but MLA_TEST_S3_BUCKET/AWS_ENDPOINT_URL are not set: \
             run `eval \"$(scripts/s3_server.sh start)\"` first"
        ),
        _ => None,
    }
}

/// A unique `s3://bucket/…/<test>` out_dir, or `None` (test skipped) without the S3 env.
pub fn s3_out_dir(test: &str) -> Option<String> {
    let Some(bucket) = s3_env() else {
        eprintln!("skipping S3 case {test}: no MLA_TEST_S3_BUCKET (scripts/s3_server.sh start)");
        return None;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Some(format!(
        "s3://{bucket}/conformance-{}-{nanos}/{test}",
        std::process::id()
    ))
}

/// One backend under test.
pub struct Fixture {
    pub kind: &'static str,
    pub out_dir: String,
    pub store: CheckpointStore,
    /// The backend below the store (no prefix applied: see `raw_path`).
    raw: Arc<dyn ObjectStore>,
    /// Prefix of the store root inside `raw` (S3 key prefix), empty otherwise.
    root: String,
    /// Whether re-opening `out_dir` reaches the same objects (not for `memory://`).
    pub persistent: bool,
    _tmp: Option<tempfile::TempDir>,
}

fn capture_raw(store: CheckpointStore) -> (CheckpointStore, Arc<dyn ObjectStore>) {
    let mut raw = None;
    let store = store.map_backend(|inner| {
        raw = Some(inner.clone());
        inner
    });
    (store, raw.expect("map_backend calls the closure"))
}

impl Fixture {
    pub fn memory(_test: &str) -> Option<Fixture> {
        let (store, raw) = capture_raw(CheckpointStore::open("memory://").unwrap());
        Some(Fixture {
            kind: "memory",
            out_dir: "memory://".into(),
            store,
            raw,
            root: String::new(),
            persistent: false,
            _tmp: None,
        })
    }

    pub fn local(_test: &str) -> Option<Fixture> {
        let tmp = tempfile::tempdir().unwrap();
        // A nested, not yet existing directory: open() creates it.
        let out_dir = tmp.path().join("out/pretrain/mla").display().to_string();
        let (store, raw) = capture_raw(CheckpointStore::open(&out_dir).unwrap());
        Some(Fixture {
            kind: "local",
            out_dir,
            store,
            raw,
            root: String::new(),
            persistent: true,
            _tmp: Some(tmp),
        })
    }

    pub fn s3(test: &str) -> Option<Fixture> {
        let out_dir = s3_out_dir(test)?;
        let root = out_dir
            .trim_start_matches("s3://")
            .split_once('/')
            .map(|(_, p)| p.to_string())
            .unwrap_or_default();
        let (store, raw) = capture_raw(CheckpointStore::open(&out_dir).unwrap());
        Some(Fixture {
            kind: "s3",
            out_dir,
            store,
            raw,
            root,
            persistent: true,
            _tmp: None,
        })
    }

    /// The same backend behind a `FaultStore`.
    pub fn faulty(&self) -> (CheckpointStore, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let store = self.store.clone().map_backend(move |inner| {
            Arc::new(FaultStore { inner, faults: f }) as Arc<dyn ObjectStore>
        });
        (store, faults)
    }

    pub fn raw_path(&self, rel: &str) -> Path {
        if self.root.is_empty() {
            Path::parse(rel).unwrap()
        } else {
            Path::parse(format!("{}/{rel}", self.root)).unwrap()
        }
    }

    /// Write an object under out_dir behind the store's back.
    pub async fn raw_put(&self, rel: &str, bytes: &[u8]) {
        self.raw
            .put(&self.raw_path(rel), PutPayload::from(bytes.to_vec()))
            .await
            .unwrap();
    }

    pub async fn raw_get(&self, rel: &str) -> Bytes {
        self.raw
            .get(&self.raw_path(rel))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    }

    pub async fn raw_delete(&self, rel: &str) {
        self.raw.delete(&self.raw_path(rel)).await.unwrap();
    }

    /// Every object under out_dir (relative paths, sorted), as the backend lists them.
    pub async fn raw_list(&self) -> Vec<String> {
        let prefix = (!self.root.is_empty()).then(|| Path::parse(&self.root).unwrap());
        let mut out: Vec<String> = self
            .raw
            .list(prefix.as_ref())
            .map(|m| {
                let p = m.unwrap().location.to_string();
                match self.root.is_empty() {
                    true => p,
                    false => p[self.root.len() + 1..].to_string(),
                }
            })
            .collect()
            .await;
        out.sort();
        out
    }

    /// The directory of a local out_dir.
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        (self.kind == "local").then(|| std::path::PathBuf::from(&self.out_dir))
    }

    pub async fn raw_exists(&self, rel: &str) -> bool {
        match self.raw.head(&self.raw_path(rel)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => panic!("head {rel}: {e}"),
        }
    }

    /// Flip one byte of a stored object (same size, different sha256).
    pub async fn flip_byte(&self, rel: &str, at: usize) {
        let path = self.raw_path(rel);
        let mut bytes = self
            .raw
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        bytes[at] ^= 0x01;
        self.raw.put(&path, PutPayload::from(bytes)).await.unwrap();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so corruption is always detectable.
pub fn payload(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// The objects of a small checkpoint at `step` (contents depend on the step).
pub fn objects(step: u64) -> Vec<(String, Bytes)> {
    vec![
        ("model.safetensors".into(), payload(3000, step)),
        ("optimizer.safetensors".into(), payload(5000, step + 1000)),
        (
            "state.json".into(),
            Bytes::from(format!("{{\"step\":{step}}}")),
        ),
        ("tokenizer/tokenizer.json".into(), payload(100, 7)),
    ]
}

pub fn meta(step: u64) -> ManifestMeta {
    ManifestMeta {
        step,
        tokens_seen: step * 4096,
        world_size: 2,
        config_digest: "sha256:cafe".into(),
        extra: serde_json::json!({"note": "test"}),
    }
}

pub fn step(n: u64) -> StepName {
    StepName::Step(n)
}

pub fn options() -> StoreOptions {
    StoreOptions::default()
}

// ---- fault injection -----------------------------------------------------------------------

/// Switches and records of a `FaultStore`.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail every put (single or multipart) and delete.
    pub fail_writes: AtomicBool,
    /// Fail puts whose path contains this string.
    pub fail_puts_containing: Mutex<Option<String>>,
    /// Sleep before each put.
    pub put_delay: Mutex<Option<Duration>>,
    /// Every put/delete, in order: `put <path>`, `put-multipart <path>`, `delete <path>`.
    pub log: Mutex<Vec<String>>,
}

impl Faults {
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn set_fail_puts_containing(&self, s: Option<&str>) {
        *self.fail_puts_containing.lock().unwrap() = s.map(String::from);
    }

    pub fn set_put_delay(&self, d: Option<Duration>) {
        *self.put_delay.lock().unwrap() = d;
    }

    fn check_put(&self, what: &str, path: &Path) -> object_store::Result<()> {
        self.log.lock().unwrap().push(format!("{what} {path}"));
        let containing = self.fail_puts_containing.lock().unwrap().clone();
        let hit = containing.is_some_and(|s| path.as_ref().contains(&s));
        if hit || self.fail_writes.load(Ordering::SeqCst) {
            return Err(injected(path));
        }
        Ok(())
    }
}

fn injected(path: &Path) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultStore",
        source: format!("injected failure writing {path}").into(),
    }
}

#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<Faults>,
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Arc<Faults>) -> FaultStore {
        FaultStore { inner, faults }
    }
}

impl std::fmt::Display for FaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let delay = *self.faults.put_delay.lock().unwrap();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        self.faults.check_put("put", location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let delay = *self.faults.put_delay.lock().unwrap();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        self.faults.check_put("put-multipart", location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let faults = self.faults.clone();
        let logged = locations
            .map(move |p| {
                let p = p?;
                faults.log.lock().unwrap().push(format!("delete {p}"));
                if faults.fail_writes.load(Ordering::SeqCst) {
                    return Err(injected(&p));
                }
                Ok(p)
            })
            .boxed();
        self.inner.delete_stream(logged)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
