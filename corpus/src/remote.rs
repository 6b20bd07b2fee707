//! Prepared token datasets on object storage (`s3://bucket/prefix`, `memory://`): [`RemoteDir`]
//! implements [`ShardSink`] and [`ShardSource`] over the storage crate's `object_store` backend
//! (same URL parsing, AWS environment, retries and timeouts as checkpoints).
//!
//! Design: **streamed, no local copy of the data**, so a dataset may be larger than any disk.
//! * Writing: one PUT per object (multipart above the store's threshold; both are atomic: the
//!   object appears whole or not at all), `index.json` last, exactly as for a local directory.
//! * Opening a shard: one HEAD (size and ETag). Every later read is a ranged GET of just the
//!   bytes asked for (a window of `block_size + 1` tokens), pinned to that ETag with `If-Match`,
//!   so an object replaced while a run reads it is an error, never a silent mix of versions.
//!   [`RandomAccess::latency_bound`] tells the loader to issue a micro-batch's reads concurrently.
//! * Checksums: verifying a shard streams it once (one GET, hashed on the fly, nothing stored).
//!   With [`RemoteDir::with_checksum_cache`] the result is remembered in a small local file keyed
//!   by (object URL, size, ETag); S3 changes the ETag whenever the object changes, so later opens
//!   of an unchanged dataset cost one HEAD per shard instead of a full download. Not for
//!   `memory://`, whose ETags are per-process counters.
//!
//! Not here: raw text on object storage (prepare it locally, write the shards here), a local
//! block cache (ranged reads are issued on demand), read-ahead (the train loader prefetches the
//! next micro-batch), credentials (AWS environment).

use std::io::ErrorKind;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use mla_storage::object_store::path::Path;
use mla_storage::object_store::{self, GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use mla_storage::{error_chain, open_location, upload_bytes, Bytes, StoreOptions};
use sha2::{Digest, Sha256};

use super::dataset::{Dataset, OpenOptions};
use super::error::DataError;
use super::format::INDEX_FILE;
use super::store::{RandomAccess, ShardSink, ShardSource};

/// The object-store URL in `location`, or `None` for a local path (plain or `file://`).
pub fn remote_url(location: &str) -> Option<&str> {
    let (scheme, _) = location.trim().split_once("://")?;
    (scheme != "file").then_some(location.trim())
}

/// Open a prepared dataset on object storage, validating it as [`Dataset::open`] does (index,
/// every shard's size and header, sha256). `checksum_cache`: see [`RemoteDir::with_checksum_cache`].
/// Without `index.json` the error says that only prepared datasets are read remotely.
pub fn open_remote(
    url: &str,
    checksum_cache: Option<PathBuf>,
    opts: OpenOptions,
) -> Result<Dataset, DataError> {
    let mut dir = RemoteDir::open(url)?;
    if let Some(cache) = checksum_cache {
        dir = dir.with_checksum_cache(cache);
    }
    if !dir.exists(INDEX_FILE)? {
        return Err(DataError::BadIndex {
            path: ShardSource::location(&dir, INDEX_FILE),
            message: format!(
                "not found; object storage is read as a prepared dataset only (raw text there is \
                 not supported): run `mla prepare <inputs> --out {}` first",
                dir.url()
            ),
        });
    }
    Dataset::open_with(Arc::new(dir), opts)
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    root: Path,
    url: String,
    opts: StoreOptions,
    rt: tokio::runtime::Runtime,
}

/// A dataset prefix in an object store. Cheap to clone; owns a small tokio runtime that drives
/// the requests of its synchronous methods (do not call them from inside an async context).
#[derive(Clone)]
pub struct RemoteDir {
    inner: Arc<Inner>,
    checksum_cache: Option<Arc<PathBuf>>,
}

impl std::fmt::Debug for RemoteDir {
    // The URL only: backends' Debug may print credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDir")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl RemoteDir {
    /// Open `url` (`s3://bucket/prefix`: settings and credentials from the AWS environment,
    /// retries/timeouts from `MLA_STORE_*` as for checkpoints). No network I/O happens here.
    pub fn open(url: &str) -> Result<Self, DataError> {
        let opts = StoreOptions::from_env().map_err(|e| storage_error(url, e))?;
        let loc = open_location(url, &opts).map_err(|e| storage_error(url, e))?;
        Self::build(loc.store, loc.root, loc.url, opts)
    }

    /// Wrap an existing backend (tests: one `InMemory` shared by writer and reader) with the
    /// objects under `prefix`; `url` is for messages only.
    pub fn from_object_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        url: &str,
        opts: StoreOptions,
    ) -> Result<Self, DataError> {
        let root = Path::parse(prefix.trim_matches('/')).map_err(|e| DataError::InvalidOption {
            key: format!("object prefix {prefix:?}"),
            message: e.to_string(),
        })?;
        Self::build(store, root, url.trim_end_matches('/').to_owned(), opts)
    }

    fn build(
        store: Arc<dyn ObjectStore>,
        root: Path,
        url: String,
        opts: StoreOptions,
    ) -> Result<Self, DataError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mla-data-io")
            .enable_all()
            .build()
            .map_err(|e| DataError::io(&url, e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                root,
                url,
                opts,
                rt,
            }),
            checksum_cache: None,
        })
    }

    /// Remember shard checksums under `dir` (created when needed), keyed by object URL, size and
    /// ETag. Ignored for `memory://`. Losing the directory only costs a re-hash.
    pub fn with_checksum_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        let memory = self.inner.url.starts_with("memory://");
        self.checksum_cache = (!memory).then(|| Arc::new(dir.into()));
        self
    }

    /// Canonical URL of the prefix (`s3://bucket/prefix`).
    pub fn url(&self) -> &str {
        &self.inner.url
    }
}

impl Inner {
    fn path(&self, name: &str) -> Result<Path, DataError> {
        let full = if self.root.as_ref().is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.root)
        };
        Path::parse(&full).map_err(|e| DataError::InvalidOption {
            key: format!("object name {name:?}"),
            message: e.to_string(),
        })
    }

    fn object_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    fn err(&self, name: &str, op: &str, e: &object_store::Error) -> DataError {
        let kind = match e {
            object_store::Error::NotFound { .. } => ErrorKind::NotFound,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => ErrorKind::PermissionDenied,
            _ => ErrorKind::Other,
        };
        let detail = match e {
            object_store::Error::Precondition { .. } => {
                "the object changed after the dataset was opened (replaced while reading?)".into()
            }
            _ => error_chain(e),
        };
        DataError::io(
            self.object_url(name),
            std::io::Error::new(kind, format!("{op}: {detail}")),
        )
    }

    async fn put(&self, name: &str, path: &Path, bytes: Bytes) -> Result<(), DataError> {
        upload_bytes(&*self.store, path, bytes, &self.opts)
            .await
            .map(drop)
            .map_err(|(op, e)| self.err(name, op, &e))
    }
}

fn storage_error(url: &str, e: mla_storage::Error) -> DataError {
    match e {
        mla_storage::Error::InvalidLocation { location, reason } => DataError::InvalidOption {
            key: format!("dataset location {location:?}"),
            message: reason,
        },
        mla_storage::Error::InvalidEnv {
            name,
            value,
            reason,
        } => DataError::InvalidOption {
            key: format!("environment variable {name}={value:?}"),
            message: reason,
        },
        other => DataError::io(url, std::io::Error::other(other.to_string())),
    }
}

impl ShardSink for RemoteDir {
    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), DataError> {
        let inner = &*self.inner;
        let path = inner.path(name)?;
        let bytes = Bytes::copy_from_slice(bytes);
        inner.rt.block_on(inner.put(name, &path, bytes))
    }

    fn exists(&self, name: &str) -> Result<bool, DataError> {
        let inner = &*self.inner;
        let path = inner.path(name)?;
        match inner.rt.block_on(inner.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(inner.err(name, "head", &e)),
        }
    }

    fn remove(&self, name: &str) -> Result<(), DataError> {
        let inner = &*self.inner;
        let path = inner.path(name)?;
        match inner.rt.block_on(inner.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(inner.err(name, "delete", &e)),
        }
    }

    fn location(&self, name: &str) -> PathBuf {
        PathBuf::from(self.inner.object_url(name))
    }
}

impl ShardSource for RemoteDir {
    fn read(&self, name: &str) -> Result<Vec<u8>, DataError> {
        let inner = &*self.inner;
        let path = inner.path(name)?;
        let bytes = inner
            .rt
            .block_on(async { inner.store.get(&path).await?.bytes().await })
            .map_err(|e| inner.err(name, "get", &e))?;
        Ok(bytes.to_vec())
    }

    fn open(&self, name: &str) -> Result<Box<dyn RandomAccess>, DataError> {
        let inner = &*self.inner;
        let path = inner.path(name)?;
        let meta = inner
            .rt
            .block_on(inner.store.head(&path))
            .map_err(|e| inner.err(name, "head", &e))?;
        Ok(Box::new(RemoteObject {
            dir: self.inner.clone(),
            name: name.to_owned(),
            path,
            len: meta.size,
            e_tag: meta.e_tag,
            checksum_cache: self.checksum_cache.clone(),
        }))
    }

    fn location(&self, name: &str) -> PathBuf {
        PathBuf::from(self.inner.object_url(name))
    }
}

/// One object, read by ranged GETs pinned to the ETag seen when it was opened.
struct RemoteObject {
    dir: Arc<Inner>,
    name: String,
    path: Path,
    len: u64,
    e_tag: Option<String>,
    checksum_cache: Option<Arc<PathBuf>>,
}

impl RemoteObject {
    fn get_options(&self, range: Option<GetRange>) -> GetOptions {
        GetOptions {
            range,
            if_match: self.e_tag.clone(),
            ..Default::default()
        }
    }

    /// Local file remembering this object version's sha256.
    fn checksum_file(&self) -> Option<PathBuf> {
        let dir = self.checksum_cache.as_ref()?;
        let e_tag = self.e_tag.as_ref()?;
        let key = Sha256::digest(format!(
            "{}\n{}\n{e_tag}",
            self.dir.object_url(&self.name),
            self.len
        ));
        Some(dir.join(format!("{}.sha256", hex::encode(&key[..16]))))
    }

    fn stream_sha256(&self) -> Result<String, DataError> {
        let dir = &*self.dir;
        let (hash, n) = dir
            .rt
            .block_on(async {
                let got = dir
                    .store
                    .get_opts(&self.path, self.get_options(None))
                    .await?;
                let mut stream = got.into_stream();
                let mut hasher = Sha256::new();
                let mut n = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    n += chunk.len() as u64;
                    hasher.update(&chunk);
                }
                Ok::<_, object_store::Error>((hex::encode(hasher.finalize()), n))
            })
            .map_err(|e| dir.err(&self.name, "get", &e))?;
        if n != self.len {
            return Err(DataError::ShardSize {
                path: dir.object_url(&self.name).into(),
                expected_bytes: self.len,
                actual_bytes: n,
            });
        }
        Ok(hash)
    }
}

impl RandomAccess for RemoteObject {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DataError> {
        let dir = &*self.dir;
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.len {
            return Err(DataError::io(
                dir.object_url(&self.name),
                std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!(
                        "read of bytes {offset}..{end} past the end ({} bytes)",
                        self.len
                    ),
                ),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let bytes = dir
            .rt
            .block_on(async {
                let opts = self.get_options(Some(GetRange::Bounded(offset..end)));
                dir.store.get_opts(&self.path, opts).await?.bytes().await
            })
            .map_err(|e| dir.err(&self.name, "get", &e))?;
        if bytes.len() != buf.len() {
            return Err(DataError::io(
                dir.object_url(&self.name),
                std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("asked for bytes {offset}..{end}, got {} bytes", bytes.len()),
                ),
            ));
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn sha256(&self) -> Result<String, DataError> {
        let memo = self.checksum_file();
        if let Some(file) = &memo {
            if let Ok(s) = std::fs::read_to_string(file) {
                let s = s.trim();
                if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Ok(s.to_owned());
                }
            }
        }
        let hash = self.stream_sha256()?;
        if let Some(file) = &memo {
            if let Err(e) = write_atomic(file, hash.as_bytes()) {
                tracing::debug!("not remembering the checksum in {}: {e}", file.display());
            }
        }
        Ok(hash)
    }

    fn latency_bound(&self) -> bool {
        true
    }
}

fn write_atomic(file: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("partial-{}", std::process::id()));
    // A new file, never through an entry of that name left or planted there.
    let _ = std::fs::remove_file(&tmp);
    std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes))?;
    std::fs::rename(&tmp, file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mla_storage::object_store::memory::InMemory;

    fn memory(opts: StoreOptions) -> (Arc<InMemory>, RemoteDir) {
        let store = Arc::new(InMemory::new());
        let dir =
            RemoteDir::from_object_store(store.clone(), "ds/v1", "memory://ds/v1", opts).unwrap();
        (store, dir)
    }

    #[test]
    fn remote_urls_are_told_from_local_paths() {
        assert_eq!(remote_url("s3://b/p"), Some("s3://b/p"));
        assert_eq!(remote_url(" memory://x "), Some("memory://x"));
        assert_eq!(remote_url("file:///tmp/x"), None);
        assert_eq!(remote_url("data/tinystories"), None);
    }

    #[test]
    fn put_read_open_exists_remove_follow_the_shard_store_contract() {
        let (store, dir) = memory(StoreOptions::default());
        dir.put("a.bin", b"hello").unwrap();
        dir.put("a.bin", b"world!").unwrap();
        assert_eq!(ShardSource::read(&dir, "a.bin").unwrap(), b"world!");
        // Objects live under the prefix.
        let raw = dir
            .inner
            .rt
            .block_on(store.head(&Path::from("ds/v1/a.bin")))
            .unwrap();
        assert_eq!(raw.size, 6);
        let f = dir.open("a.bin").unwrap();
        assert_eq!(f.len(), 6);
        assert!(f.latency_bound());
        let mut buf = [0u8; 3];
        f.read_exact_at(&mut buf, 2).unwrap();
        assert_eq!(&buf, b"rld");
        let e = f.read_exact_at(&mut buf, 5).unwrap_err().to_string();
        assert!(e.starts_with("memory://ds/v1/a.bin: "), "{e}");
        assert_eq!(f.sha256().unwrap(), hex::encode(Sha256::digest(b"world!")));
        assert!(dir.exists("a.bin").unwrap());
        dir.remove("a.bin").unwrap();
        dir.remove("a.bin").unwrap();
        assert!(!dir.exists("a.bin").unwrap());
        let missing = ShardSource::read(&dir, "index.json").unwrap_err();
        assert!(
            matches!(&missing, DataError::Io { error, .. } if error.kind() == ErrorKind::NotFound),
            "{missing}"
        );
        assert!(missing
            .to_string()
            .starts_with("memory://ds/v1/index.json: "));
    }

    #[test]
    fn large_objects_go_up_as_multipart_and_read_back_whole() {
        let opts = StoreOptions {
            multipart_threshold_bytes: 1000,
            part_size_bytes: 300,
            ..StoreOptions::default()
        };
        let (_, dir) = memory(opts);
        let bytes: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        dir.put("big.bin", &bytes).unwrap();
        assert_eq!(ShardSource::read(&dir, "big.bin").unwrap(), bytes);
        let f = dir.open("big.bin").unwrap();
        let mut buf = vec![0u8; 700];
        f.read_exact_at(&mut buf, 1234).unwrap();
        assert_eq!(buf, &bytes[1234..1934]);
    }

    #[test]
    fn an_object_replaced_after_open_is_an_error_not_a_mix_of_versions() {
        let (_, dir) = memory(StoreOptions::default());
        dir.put("s.bin", b"version one").unwrap();
        let f = dir.open("s.bin").unwrap();
        dir.put("s.bin", b"version two").unwrap();
        let mut buf = [0u8; 7];
        let e = f.read_exact_at(&mut buf, 0).unwrap_err().to_string();
        assert!(
            e.contains("memory://ds/v1/s.bin") && e.contains("changed"),
            "{e}"
        );
    }

    #[test]
    fn checksum_cache_remembers_each_object_version() {
        let data = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let url = format!("file://{}", data.path().display());
        let dir = RemoteDir::open(&url)
            .unwrap()
            .with_checksum_cache(cache.path());
        dir.put("s.bin", b"tokens").unwrap();
        let f = dir.open("s.bin").unwrap();
        let real = hex::encode(Sha256::digest(b"tokens"));
        assert_eq!(f.sha256().unwrap(), real);
        let memo = f_checksum_file(&dir, "s.bin");
        assert_eq!(std::fs::read_to_string(&memo).unwrap(), real);
        // The remembered value is what a later open of the same version reports.
        std::fs::write(&memo, "ab".repeat(32)).unwrap();
        assert_eq!(
            dir.open("s.bin").unwrap().sha256().unwrap(),
            "ab".repeat(32)
        );
        // A new version (new ETag) is hashed again.
        std::thread::sleep(std::time::Duration::from_millis(10));
        dir.put("s.bin", b"tokenz").unwrap();
        assert_eq!(
            dir.open("s.bin").unwrap().sha256().unwrap(),
            hex::encode(Sha256::digest(b"tokenz"))
        );
    }

    fn f_checksum_file(dir: &RemoteDir, name: &str) -> PathBuf {
        let path = dir.inner.path(name).unwrap();
        let meta = dir.inner.rt.block_on(dir.inner.store.head(&path)).unwrap();
        let f = RemoteObject {
            dir: dir.inner.clone(),
            name: name.into(),
            path,
            len: meta.size,
            e_tag: meta.e_tag,
            checksum_cache: dir.checksum_cache.clone(),
        };
        f.checksum_file().unwrap()
    }

    #[test]
    fn memory_stores_never_use_the_checksum_cache() {
        let cache = tempfile::tempdir().unwrap();
        let (_, dir) = memory(StoreOptions::default());
        let dir = dir.with_checksum_cache(cache.path());
        dir.put("s.bin", b"x").unwrap();
        dir.open("s.bin").unwrap().sha256().unwrap();
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }
}
