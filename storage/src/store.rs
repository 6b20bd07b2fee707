//! `CheckpointStore`: the manifest-last checkpoint protocol over any `object_store` backend.
//!
//! Layout under `out_dir`: `step-00000400/{objects…, manifest.json}` and `final/`.
//! * A step **exists** iff its `manifest.json` is present and valid. Objects first, manifest last,
//!   so a crash at any point leaves either the old state or an invisible, partial directory.
//! * **Overwrite rule**: writing a step that already exists first deletes its manifest (the step
//!   vanishes), then its objects, then uploads the new objects and finally the new manifest.
//!   Readers in between fall back to older steps; they never see a mix of old and new objects.
//! * **Delete rule**: manifest first, then the objects, so a half-deleted step is invisible.
//! * **Retention** (`retain`) only touches numbered step directories: never `final/`, never other
//!   objects under `out_dir`, never the newest valid step, never an uncommitted directory newer
//!   than the newest kept step (it may be a save in flight).
//!
//! Not here: tensors (the trainer serialises them to bytes), background uploads (`saver.rs`),
//! blocking wrappers (`blocking.rs`), and any policy about what to do when a step is bad (errors
//! and skip lists are returned so the caller can warn, fall back or stop).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::error::{Corruption, Error, Result};
use crate::local::remove_staging_files;
use crate::location::{self, Location};
use crate::manifest::{
    check_object_name, sha256_hex, Manifest, ManifestMeta, ObjectEntry, StepName, MANIFEST_NAME,
};
use crate::options::StoreOptions;

/// The largest `manifest.json` read (a manifest lists a few objects: ~1 KiB). A bigger one is
/// invalid, not read: an out_dir is untrusted input (README "Security").
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// What `put_object` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    /// The manifest entry of the object (size and sha256 of the bytes sent).
    pub entry: ObjectEntry,
    /// 1 for a single PUT, else the number of multipart parts.
    pub parts: usize,
    pub multipart: bool,
    /// ETag reported by the store (S3 multipart ETags end in `-<parts>`).
    pub e_tag: Option<String>,
}

/// Result of verification in a listing (verification reads every byte, so it is opt-in).
#[derive(Debug, Clone)]
pub enum Verification {
    NotChecked,
    Verified,
    Failed(Error),
    /// The checksums verify but a reader found the contents unusable (set by callers that
    /// look inside the objects, e.g. `mla ckpt list --verify`), with why.
    Unloadable(String),
}

/// One step directory as `list` sees it, committed or not.
#[derive(Debug, Clone)]
pub struct StepInfo {
    pub step: StepName,
    /// The valid manifest; `None` means the step does not exist (yet, or any more).
    pub manifest: Option<Manifest>,
    /// Why the step does not exist: `MissingManifest` or `InvalidManifest`.
    pub manifest_error: Option<Error>,
    /// Objects in the directory other than `manifest.json`.
    pub object_count: usize,
    /// Bytes stored in the directory, manifest included (as listed, not as the manifest says).
    pub total_bytes: u64,
    pub verification: Verification,
}

impl StepInfo {
    /// Committed: a valid manifest is present.
    pub fn exists(&self) -> bool {
        self.manifest.is_some()
    }

    pub fn tokens_seen(&self) -> Option<u64> {
        self.manifest.as_ref().map(|m| m.tokens_seen)
    }

    /// The optimizer step: the manifest's, else the directory's (`None` for an unreadable final).
    pub fn optimizer_step(&self) -> Option<u64> {
        self.manifest
            .as_ref()
            .map(|m| m.step)
            .or(self.step.number())
    }

    /// Newest-last order used by `list` and `latest_valid`: by optimizer step, `final` after
    /// a numbered step of the same step, a `final/` of unknown step newest of all.
    fn order_key(&self) -> (u64, bool) {
        (
            self.optimizer_step().unwrap_or(u64::MAX),
            self.step == StepName::Final,
        )
    }
}

/// A step that `latest_valid` passed over, newest first, with the reason (`MissingManifest`,
/// `InvalidManifest`, `Corrupt`): what the caller should warn about.
#[derive(Debug, Clone)]
pub struct SkippedStep {
    pub step: StepName,
    pub reason: Error,
}

/// A step whose manifest and checksums verified.
#[derive(Debug, Clone)]
pub struct VerifiedStep {
    pub step: StepName,
    pub manifest: Manifest,
}

/// A verified step with all its objects in memory.
#[derive(Debug, Clone)]
pub struct LoadedStep {
    pub step: StepName,
    pub manifest: Manifest,
    pub objects: BTreeMap<String, Bytes>,
}

impl LoadedStep {
    pub fn object(&self, name: &str) -> Option<&Bytes> {
        self.objects.get(name)
    }
}

/// Answer of `latest_valid` / `load_latest_valid`.
#[derive(Debug, Clone)]
pub struct Latest<T> {
    /// The newest valid step, `None` when there is none (fresh start).
    pub found: Option<T>,
    /// Newer step directories that were passed over, newest first.
    pub skipped: Vec<SkippedStep>,
}

/// What `retain` kept and deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetainReport {
    pub newest_valid: Option<StepName>,
    pub kept: Vec<StepName>,
    pub deleted: Vec<StepName>,
}

/// Checkpoint store rooted at an `out_dir`. Cheap to clone (shares the backend).
#[derive(Clone)]
pub struct CheckpointStore {
    pub(crate) inner: Arc<dyn ObjectStore>,
    pub(crate) root: Path,
    pub(crate) url: String,
    opts: StoreOptions,
    /// The directory of a local out_dir: checked for symlinks and staging leftovers with
    /// std::fs, which object_store's local backend hides (it follows links and skips `name#N`).
    pub(crate) local_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for CheckpointStore {
    // Only the URL: backends' Debug may include credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl CheckpointStore {
    /// Open `out_dir`: a path (relative or absolute; created if missing), `file://path`,
    /// `s3://bucket/prefix` (settings from the AWS environment) or `memory://` (a new, empty
    /// in-process store). No network I/O happens here. Options: [`StoreOptions::from_env`].
    pub fn open(out_dir: &str) -> Result<Self> {
        Self::open_with(out_dir, StoreOptions::from_env()?)
    }

    pub fn open_with(out_dir: &str, opts: StoreOptions) -> Result<Self> {
        let loc: Location = location::parse(out_dir)?;
        let mut inner = location::open_backend(&loc, &opts)?;
        if let Some(delay) = opts.put_delay {
            inner = Arc::new(crate::delay::PutDelayStore { inner, delay });
        }
        let local_dir = match &loc.backend {
            location::Backend::Local(dir) => Some(dir.clone()),
            _ => None,
        };
        Ok(CheckpointStore {
            inner,
            root: loc.root,
            url: loc.url,
            opts,
            local_dir,
        })
    }

    /// Wrap an existing backend (tests inject faults this way); `url` is used in messages only.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: &str, opts: StoreOptions) -> Self {
        CheckpointStore {
            inner,
            root: Path::default(),
            url: url.to_string(),
            opts,
            local_dir: None,
        }
    }

    /// Wrap the backend, keeping root, URL and options: object_store layers (`ThrottledStore`,
    /// `LimitStore`) or fault injection in tests.
    pub fn map_backend(
        self,
        wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>,
    ) -> Self {
        CheckpointStore {
            inner: wrap(self.inner),
            ..self
        }
    }

    /// Open the `out_dir` of a step directory given as a path or URL
    /// (`out/pretrain/mla/step-00000400`, `s3://b/p/final`) and name the step.
    /// Options: [`StoreOptions::from_env`].
    pub fn resolve(step_dir: &str) -> Result<(Self, StepName)> {
        let (out_dir, step) = location::split_step_dir(step_dir)?;
        Ok((Self::open(&out_dir)?, step))
    }

    pub fn resolve_with(step_dir: &str, opts: StoreOptions) -> Result<(Self, StepName)> {
        let (out_dir, step) = location::split_step_dir(step_dir)?;
        Ok((Self::open_with(&out_dir, opts)?, step))
    }

    /// The store root, e.g. `s3://bucket/prefix` (no credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn step_url(&self, step: &StepName) -> String {
        format!("{}/{step}", self.url)
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    // ---- paths -------------------------------------------------------------------------------

    pub(crate) fn path(&self, rel: &str) -> Result<Path> {
        let full = if self.root.as_ref().is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.root)
        };
        Path::parse(&full).map_err(|e| Error::InvalidObjectName {
            name: rel.to_string(),
            reason: e.to_string(),
        })
    }

    fn step_path(&self, step: &StepName) -> Result<Path> {
        self.path(&step.to_string())
    }

    /// Path of `location` relative to the root, as a string (for messages).
    fn rel(&self, location: &Path) -> String {
        match location.prefix_match(&self.root) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => location.to_string(),
        }
    }

    pub(crate) fn store_err(
        &self,
        op: &'static str,
        rel: impl Into<String>,
        e: &object_store::Error,
    ) -> Error {
        Error::store(op, &self.url, rel, e)
    }

    // ---- writing -----------------------------------------------------------------------------

    /// Write a whole step: `begin_step`, every object, then the manifest (last).
    /// Returns the committed manifest.
    pub async fn write_step(
        &self,
        step: &StepName,
        objects: &[(String, Bytes)],
        meta: ManifestMeta,
    ) -> Result<Manifest> {
        let mut names = std::collections::BTreeSet::new();
        for (name, _) in objects {
            check_object_name(name)?;
            if !names.insert(name.as_str()) {
                return Err(Error::InvalidObjectName {
                    name: name.clone(),
                    reason: "given twice".into(),
                });
            }
        }
        self.begin_step(step).await?;
        let written = async {
            let mut entries = Vec::with_capacity(objects.len());
            for (name, bytes) in objects {
                entries.push(self.put_object(step, name, bytes.clone()).await?.entry);
            }
            self.commit_step(step, meta, entries).await
        }
        .await;
        if written.is_err() {
            // The step is invisible (no manifest); do not leave its bytes behind to fill the
            // disk (a save that failed for lack of space would otherwise keep it full).
            // Best effort: a store that just failed may fail this too.
            self.discard_step(step).await;
        }
        written
    }

    /// Delete an uncommitted step's objects and, on local disk, the staging files of uploads
    /// that never finished (`name#N`, which object_store's listing does not show). Best effort.
    async fn discard_step(&self, step: &StepName) {
        if let Err(e) = self.delete_step(step).await {
            tracing::debug!("discarding the failed save of {step}: {e}");
        }
        if let Some(dir) = &self.local_dir {
            let step_dir = dir.join(self.root.as_ref()).join(step.to_string());
            if !crate::local::is_real_dir(&step_dir) {
                return; // a link in its place: never walked into
            }
            let removed = remove_staging_files(&step_dir);
            if removed > 0 {
                tracing::debug!("discarding the failed save of {step}: {removed} staging file(s)");
            }
            let _ = std::fs::remove_dir(&step_dir); // only when empty
        }
    }

    /// Make `step` invisible and empty before (re)writing it: delete its manifest, then every
    /// other object in the directory. A no-op for a directory that does not exist.
    ///
    /// Multi-rank saves: one rank calls `begin_step`, barrier, every rank `put_object`s its
    /// objects, the entries are gathered, barrier, one rank calls `commit_step`.
    pub async fn begin_step(&self, step: &StepName) -> Result<()> {
        self.delete_step(step).await
    }

    /// Upload one object of `step` (single PUT or multipart by size) and hash it on the way.
    /// The object counts only once `commit_step` lists it in the manifest.
    pub async fn put_object(
        &self,
        step: &StepName,
        name: &str,
        bytes: Bytes,
    ) -> Result<PutOutcome> {
        check_object_name(name)?;
        let rel = format!("{step}/{name}");
        let path = self.path(&rel)?;
        let to_hash = bytes.clone();
        let hash = tokio::task::spawn_blocking(move || sha256_hex(&to_hash));
        let upload = self.upload(&rel, &path, bytes.clone());
        let (hash, uploaded) = tokio::join!(hash, upload);
        let (parts, multipart, e_tag) = uploaded?;
        let sha256 = hash.map_err(|e| Error::Internal {
            detail: format!("hashing {rel}: {e}"),
        })?;
        Ok(PutOutcome {
            entry: ObjectEntry {
                name: name.to_string(),
                size_bytes: bytes.len() as u64,
                sha256,
            },
            parts,
            multipart,
            e_tag,
        })
    }

    async fn upload(
        &self,
        rel: &str,
        path: &Path,
        bytes: Bytes,
    ) -> Result<(usize, bool, Option<String>)> {
        let up = upload_bytes(&*self.inner, path, bytes, &self.opts)
            .await
            .map_err(|(op, e)| self.store_err(op, rel, &e))?;
        Ok((up.parts, up.multipart, up.e_tag))
    }

    /// Commit `step`: check every listed object is present with the listed size, then write
    /// `manifest.json`. Multi-rank saves call `put_object` on each rank, gather the entries and
    /// commit once after a barrier.
    pub async fn commit_step(
        &self,
        step: &StepName,
        meta: ManifestMeta,
        objects: Vec<ObjectEntry>,
    ) -> Result<Manifest> {
        let manifest = Manifest::new(step.clone(), meta, objects);
        manifest
            .check(step)
            .map_err(|reason| Error::InvalidManifest {
                url: self.url.clone(),
                step: step.clone(),
                reason,
            })?;
        for o in &manifest.objects {
            let rel = format!("{step}/{}", o.name);
            let actual = match self.inner.head(&self.path(&rel)?).await {
                Ok(meta) => meta.size,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(self.corrupt(step, &o.name, Corruption::Missing))
                }
                Err(e) => return Err(self.store_err("head", rel, &e)),
            };
            if actual != o.size_bytes {
                return Err(self.corrupt(
                    step,
                    &o.name,
                    Corruption::SizeMismatch {
                        expected_bytes: o.size_bytes,
                        actual_bytes: actual,
                    },
                ));
            }
        }
        let rel = format!("{step}/{MANIFEST_NAME}");
        self.inner
            .put(&self.path(&rel)?, PutPayload::from(manifest.to_json()))
            .await
            .map_err(|e| self.store_err("put", rel, &e))?;
        Ok(manifest)
    }

    /// Delete a step: manifest first (the step vanishes), then the other objects, then
    /// whatever stands in place of the directory (on local disk a symbolic link or a file
    /// named like a step: removed itself, never what a link points to; see `local.rs`).
    /// Deleting a missing step is not an error.
    pub async fn delete_step(&self, step: &StepName) -> Result<()> {
        let rel = format!("{step}/{MANIFEST_NAME}");
        match self.inner.delete(&self.path(&rel)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.store_err("delete", rel, &e)),
        }
        let dir = self.step_path(step)?;
        let listed: Vec<Path> = self
            .inner
            .list(Some(&dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| self.store_err("list", step.to_string(), &e))?;
        let mut deleted = self
            .inner
            .delete_stream(futures::stream::iter(listed.into_iter().map(Ok)).boxed());
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.store_err("delete", step.to_string(), &e)),
            }
        }
        match self.inner.delete(&dir).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err("delete", step.to_string(), &e)),
        }
    }

    // ---- reading -----------------------------------------------------------------------------

    /// The valid manifest of `step`; `MissingManifest` / `InvalidManifest` when the step does not
    /// exist.
    pub async fn read_manifest(&self, step: &StepName) -> Result<Manifest> {
        let rel = format!("{step}/{MANIFEST_NAME}");
        let invalid = |reason: String| Error::InvalidManifest {
            url: self.url.clone(),
            step: step.clone(),
            reason,
        };
        // A linked or special manifest makes the step invisible, as a bad one does.
        if let Err(Error::Corrupt { problem, .. }) =
            self.check_local_file(step, MANIFEST_NAME, &rel)
        {
            return Err(invalid(problem.to_string()));
        }
        let bytes = match self.inner.get(&self.path(&rel)?).await {
            Ok(r) if r.meta.size > MAX_MANIFEST_BYTES => {
                return Err(invalid(format!(
                    "{} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})",
                    r.meta.size
                )))
            }
            Ok(r) => r
                .bytes()
                .await
                .map_err(|e| self.store_err("get", &rel, &e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::MissingManifest {
                    url: self.url.clone(),
                    step: step.clone(),
                })
            }
            Err(e) => return Err(self.store_err("get", rel, &e)),
        };
        Manifest::from_json(&bytes, step).map_err(invalid)
    }

    /// The manifest entry of object `name` of a committed step.
    async fn entry(&self, step: &StepName, name: &str) -> Result<ObjectEntry> {
        check_object_name(name)?;
        let manifest = self.read_manifest(step).await?;
        manifest
            .object(name)
            .cloned()
            .ok_or_else(|| Error::UnknownObject {
                url: self.url.clone(),
                step: step.clone(),
                object: name.to_string(),
            })
    }

    /// One object of a committed step, checked against the manifest (size and sha256).
    pub async fn read_object(&self, step: &StepName, name: &str) -> Result<Bytes> {
        let entry = self.entry(step, name).await?;
        self.fetch_checked(step, &entry, true)
            .await?
            .ok_or_else(|| Error::Internal {
                detail: "object read without keeping its bytes".into(),
            })
    }

    /// Bytes `range` of one object of a committed step (listed in its manifest), without the
    /// checksum (only the whole object can be hashed): for reading a file's header.
    pub async fn read_object_range(
        &self,
        step: &StepName,
        name: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        let entry = self.entry(step, name).await?;
        if range.end > entry.size_bytes || range.start > range.end {
            return Err(self.corrupt(
                step,
                name,
                Corruption::SizeMismatch {
                    expected_bytes: entry.size_bytes,
                    actual_bytes: range.end,
                },
            ));
        }
        let rel = format!("{step}/{name}");
        self.check_local_file(step, name, &rel)?;
        self.inner
            .get_range(&self.path(&rel)?, range)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => {
                    self.corrupt(step, name, Corruption::Missing)
                }
                e => self.store_err("get", rel, &e),
            })
    }

    /// Re-read every object of `step` and check its size and sha256; the first bad object (in
    /// manifest order) is named in `Error::Corrupt`. Returns the manifest when all is well.
    pub async fn verify(&self, step: &StepName) -> Result<Manifest> {
        let manifest = self.read_manifest(step).await?;
        self.check_objects(step, &manifest, false).await?;
        Ok(manifest)
    }

    /// `verify` and keep the bytes: what resume needs, reading each object once.
    pub async fn load_step(&self, step: &StepName) -> Result<LoadedStep> {
        let manifest = self.read_manifest(step).await?;
        let objects = self.check_objects(step, &manifest, true).await?;
        Ok(LoadedStep {
            step: step.clone(),
            manifest,
            objects,
        })
    }

    async fn check_objects(
        &self,
        step: &StepName,
        manifest: &Manifest,
        keep: bool,
    ) -> Result<BTreeMap<String, Bytes>> {
        // `buffered` keeps manifest order, so the first error reported is the first bad object.
        // Owned captures: borrowing closures make these futures !Send for `tokio::spawn`.
        let mut results = futures::stream::iter(manifest.objects.clone())
            .map(|entry| {
                let (this, step) = (self.clone(), step.clone());
                async move {
                    let bytes = this.fetch_checked(&step, &entry, keep).await?;
                    Ok::<_, Error>((entry.name, bytes))
                }
            })
            .buffered(self.opts.verify_concurrency.max(1));
        let mut out = BTreeMap::new();
        while let Some(r) = results.next().await {
            let (name, bytes) = r?;
            if let Some(bytes) = bytes {
                out.insert(name, bytes);
            }
        }
        Ok(out)
    }

    /// On local disk, every component of `rel` below the out_dir must be a real directory and
    /// the object a regular file: a symbolic link planted in a step directory (to /etc/passwd,
    /// to another run's file) is refused, never followed. A missing path passes: the read that
    /// follows reports it.
    fn check_local_file(&self, step: &StepName, object: &str, rel: &str) -> Result<()> {
        let Some(dir) = &self.local_dir else {
            return Ok(());
        };
        let mut p = dir.join(self.root.as_ref());
        let parts: Vec<&str> = rel.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            p.push(part);
            let last = i + 1 == parts.len();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                return Ok(());
            };
            let kind = if m.file_type().is_symlink() {
                Some("a symbolic link")
            } else if last && !m.is_file() {
                Some("not a regular file")
            } else if !last && !m.is_dir() {
                Some("not a directory")
            } else {
                None
            };
            if let Some(kind) = kind {
                let what = if last {
                    ""
                } else {
                    "a parent directory of it "
                };
                return Err(self.corrupt(
                    step,
                    object,
                    Corruption::NotRegular {
                        what: format!("{what}is {kind} ({})", p.display()),
                    },
                ));
            }
        }
        Ok(())
    }

    fn corrupt(&self, step: &StepName, object: &str, problem: Corruption) -> Error {
        Error::Corrupt {
            url: self.url.clone(),
            step: step.clone(),
            object: object.to_string(),
            problem,
        }
    }

    /// Read one object and compare it with its manifest entry; `Some(bytes)` when `keep`.
    async fn fetch_checked(
        &self,
        step: &StepName,
        entry: &ObjectEntry,
        keep: bool,
    ) -> Result<Option<Bytes>> {
        let rel = format!("{step}/{}", entry.name);
        self.check_local_file(step, &entry.name, &rel)?;
        let got = match self.inner.get(&self.path(&rel)?).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(self.corrupt(step, &entry.name, Corruption::Missing))
            }
            Err(e) => return Err(self.store_err("get", rel, &e)),
        };
        let size_err = |actual_bytes| {
            self.corrupt(
                step,
                &entry.name,
                Corruption::SizeMismatch {
                    expected_bytes: entry.size_bytes,
                    actual_bytes,
                },
            )
        };
        if got.meta.size != entry.size_bytes {
            return Err(size_err(got.meta.size));
        }
        let (actual, kept) = if keep {
            let bytes = got
                .bytes()
                .await
                .map_err(|e| self.store_err("get", &rel, &e))?;
            let to_hash = bytes.clone();
            let sha = tokio::task::spawn_blocking(move || sha256_hex(&to_hash))
                .await
                .map_err(|e| Error::Internal {
                    detail: format!("hashing {rel}: {e}"),
                })?;
            (sha, Some(bytes))
        } else {
            let mut stream = got.into_stream();
            let mut hasher = Sha256::new();
            let mut n = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.store_err("get", &rel, &e))?;
                n += chunk.len() as u64;
                hasher.update(&chunk);
            }
            if n != entry.size_bytes {
                return Err(size_err(n));
            }
            (hex::encode(hasher.finalize()), None)
        };
        if let Some(b) = &kept {
            if b.len() as u64 != entry.size_bytes {
                return Err(size_err(b.len() as u64));
            }
        }
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(self.corrupt(
                step,
                &entry.name,
                Corruption::Sha256Mismatch {
                    expected: entry.sha256.clone(),
                    actual,
                },
            ));
        }
        Ok(kept)
    }

    // ---- listing -----------------------------------------------------------------------------

    /// Every step directory (committed or not), oldest first by optimizer step; manifests are
    /// read, objects are not (`verification` is `NotChecked`; see `list_verified`).
    pub async fn list(&self) -> Result<Vec<StepInfo>> {
        let prefix = (!self.root.as_ref().is_empty()).then_some(&self.root);
        let metas: Vec<object_store::ObjectMeta> = self
            .inner
            .list(prefix)
            .try_collect()
            .await
            .map_err(|e| self.store_err("list", "", &e))?;
        // dir → (object count, total bytes, has manifest file)
        let mut dirs: BTreeMap<StepName, (usize, u64, bool)> = BTreeMap::new();
        for m in metas {
            let rel = self.rel(&m.location);
            let Some((dir, name)) = rel.split_once('/') else {
                // A file directly under out_dir, not ours to interpret, unless it is named
                // like a step: a link or a file in place of a step directory (an incomplete
                // step: what clean-up and retention remove, the link itself).
                if let Some(step) = StepName::parse(&rel) {
                    let e = dirs.entry(step).or_default();
                    e.0 += 1;
                    e.1 += m.size;
                }
                continue;
            };
            let Some(step) = StepName::parse(dir) else {
                continue; // not a step directory: never ours to interpret
            };
            let e = dirs.entry(step).or_default();
            e.1 += m.size;
            if name == MANIFEST_NAME {
                e.2 = true;
            } else {
                e.0 += 1;
            }
        }
        let mut infos: Vec<StepInfo> = futures::stream::iter(dirs)
            .map(|(step, (object_count, total_bytes, has_manifest))| {
                let this = self.clone();
                async move {
                    let (manifest, manifest_error) = if has_manifest {
                        match this.read_manifest(&step).await {
                            Ok(m) => (Some(m), None),
                            Err(
                                e @ (Error::MissingManifest { .. } | Error::InvalidManifest { .. }),
                            ) => (None, Some(e)),
                            Err(e) => return Err(e),
                        }
                    } else {
                        let e = Error::MissingManifest {
                            url: this.url.clone(),
                            step: step.clone(),
                        };
                        (None, Some(e))
                    };
                    Ok(StepInfo {
                        step,
                        manifest,
                        manifest_error,
                        object_count,
                        total_bytes,
                        verification: Verification::NotChecked,
                    })
                }
            })
            .buffered(8)
            .try_collect()
            .await?;
        infos.sort_by_key(|i| i.order_key());
        Ok(infos)
    }

    /// `list`, then verify every committed step (reads everything: slow on big stores).
    pub async fn list_verified(&self) -> Result<Vec<StepInfo>> {
        let mut infos = self.list().await?;
        for info in &mut infos {
            if info.manifest.is_some() {
                info.verification = match self.verify(&info.step).await {
                    Ok(_) => Verification::Verified,
                    Err(e) if is_invalid_step(&e) => Verification::Failed(e),
                    Err(e) => return Err(e),
                };
            }
        }
        Ok(infos)
    }

    /// The newest step whose manifest and checksums verify, falling back to older ones; the
    /// newer directories passed over are returned with the reason (for a warning).
    /// Store errors (network, permissions) are returned as errors, not skipped: falling back
    /// because of a flaky network would silently lose progress.
    pub async fn latest_valid(&self) -> Result<Latest<VerifiedStep>> {
        self.latest(|step| async move {
            let manifest = self.verify(&step).await?;
            Ok(VerifiedStep { step, manifest })
        })
        .await
    }

    /// `latest_valid`, keeping the bytes of the step found (resume reads each object once).
    pub async fn load_latest_valid(&self) -> Result<Latest<LoadedStep>> {
        self.latest(|step| async move { self.load_step(&step).await })
            .await
    }

    async fn latest<T, F, Fut>(&self, check: F) -> Result<Latest<T>>
    where
        F: Fn(StepName) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let infos = self.list().await?;
        let mut skipped = Vec::new();
        for info in infos.into_iter().rev() {
            if let Some(reason) = info.manifest_error {
                skipped.push(SkippedStep {
                    step: info.step,
                    reason,
                });
                continue;
            }
            match check(info.step.clone()).await {
                Ok(found) => {
                    return Ok(Latest {
                        found: Some(found),
                        skipped,
                    })
                }
                Err(reason) if is_invalid_step(&reason) => skipped.push(SkippedStep {
                    step: info.step,
                    reason,
                }),
                Err(e) => return Err(e),
            }
        }
        Ok(Latest {
            found: None,
            skipped,
        })
    }

    // ---- retention ---------------------------------------------------------------------------

    /// Keep the newest `keep_last` (at least 1) committed numbered steps and the newest valid
    /// step (found by verifying from the newest down: reads that step in full); delete older
    /// numbered step directories, committed or not. `final/` and non-step objects are never
    /// touched. When no step verifies, nothing is deleted.
    pub async fn retain(&self, keep_last: usize) -> Result<RetainReport> {
        self.retain_inner(keep_last, None).await
    }

    /// `retain` right after `saved` was written by this process (its bytes were hashed on the
    /// way up), so `saved` is taken as the newest valid step without re-reading it.
    pub async fn retain_after_save(
        &self,
        keep_last: usize,
        saved: &StepName,
    ) -> Result<RetainReport> {
        self.retain_inner(keep_last, Some(saved)).await
    }

    async fn retain_inner(
        &self,
        keep_last: usize,
        known_valid: Option<&StepName>,
    ) -> Result<RetainReport> {
        let infos = self.list().await?;
        let committed: Vec<&StepInfo> = infos
            .iter()
            .filter(|i| i.exists() && i.step != StepName::Final)
            .collect();
        let newest_valid = match known_valid {
            Some(step) => Some(step.clone()),
            None => {
                let mut found = None;
                for info in committed.iter().rev() {
                    match self.verify(&info.step).await {
                        Ok(_) => {
                            found = Some(info.step.clone());
                            break;
                        }
                        Err(e) if is_invalid_step(&e) => {
                            tracing::warn!("retention: {e}");
                        }
                        Err(e) => return Err(e),
                    }
                }
                found
            }
        };
        let mut report = RetainReport {
            newest_valid: newest_valid.clone(),
            ..Default::default()
        };
        let Some(newest_valid) = newest_valid else {
            report.kept = infos.iter().map(|i| i.step.clone()).collect();
            return Ok(report);
        };
        let mut keep: std::collections::BTreeSet<StepName> = committed
            .iter()
            .rev()
            .take(keep_last.max(1))
            .map(|i| i.step.clone())
            .collect();
        keep.insert(newest_valid);
        let newest_kept = keep.iter().filter_map(StepName::number).max().unwrap_or(0);
        for info in &infos {
            let Some(n) = info.step.number() else {
                report.kept.push(info.step.clone()); // final/
                continue;
            };
            let delete = !keep.contains(&info.step) && (info.exists() || n < newest_kept);
            if delete {
                self.delete_step(&info.step).await?;
                report.deleted.push(info.step.clone());
            } else {
                report.kept.push(info.step.clone());
            }
        }
        Ok(report)
    }
}

/// Errors that mean "this step is not a valid checkpoint" rather than "the store failed".
pub fn is_invalid_step(e: &Error) -> bool {
    matches!(
        e,
        Error::MissingManifest { .. } | Error::InvalidManifest { .. } | Error::Corrupt { .. }
    )
}

/// How [`upload_bytes`] sent an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub parts: usize,
    pub multipart: bool,
    pub e_tag: Option<String>,
}

/// Upload `bytes` to `path`: one PUT up to `opts.multipart_threshold_bytes`, else a multipart
/// upload in `opts.part_size_bytes` parts with at most `opts.max_concurrency` in flight
/// (aborted on failure). Either way the object appears whole or not at all. An error comes
/// with the operation that failed ("put", "start multipart upload", …) for the caller's
/// message. Shared by checkpoints and token datasets.
pub async fn upload_bytes(
    store: &dyn ObjectStore,
    path: &Path,
    bytes: Bytes,
    opts: &StoreOptions,
) -> std::result::Result<Uploaded, (&'static str, object_store::Error)> {
    if bytes.len() <= opts.multipart_threshold_bytes {
        let r = store
            .put(path, PutPayload::from(bytes))
            .await
            .map_err(|e| ("put", e))?;
        return Ok(Uploaded {
            parts: 1,
            multipart: false,
            e_tag: r.e_tag,
        });
    }
    let part = opts.part_size_bytes.max(1);
    let upload = store
        .put_multipart(path)
        .await
        .map_err(|e| ("start multipart upload", e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
    let mut parts = 0;
    let mut offset = 0;
    while offset < bytes.len() {
        if let Err(e) = writer.wait_for_capacity(opts.max_concurrency.max(1)).await {
            // Best effort: the store garbage-collects what abort cannot.
            let _ = writer.abort().await;
            return Err(("multipart upload", e));
        }
        let end = (offset + part).min(bytes.len());
        writer.put(bytes.slice(offset..end));
        offset = end;
        parts += 1;
    }
    let r = writer
        .finish()
        .await
        .map_err(|e| ("complete multipart upload", e))?;
    Ok(Uploaded {
        parts,
        multipart: true,
        e_tag: r.e_tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn put_delay_slows_every_put_of_a_save() {
        let objects: Vec<(String, Bytes)> = (0..3)
            .map(|i| (format!("o{i}.bin"), Bytes::from(vec![i as u8; 10])))
            .collect();
        let opts = StoreOptions {
            put_delay: Some(Duration::from_millis(40)),
            ..StoreOptions::default()
        };
        let store = CheckpointStore::open_with("memory://", opts).unwrap();
        let t0 = std::time::Instant::now();
        store
            .write_step(
                &StepName::Step(1),
                &objects,
                ManifestMeta {
                    step: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        // 3 objects + the manifest.
        assert!(
            t0.elapsed() >= Duration::from_millis(160),
            "{:?}",
            t0.elapsed()
        );
        store.verify(&StepName::Step(1)).await.unwrap();
    }
}
