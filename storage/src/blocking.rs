//! `BlockingCheckpointStore`: the `CheckpointStore` API for synchronous callers (the training
//! loop, `mla ckpt`), each call driven to completion on a small private tokio runtime.
//!
//! Not for use inside an async context (tokio refuses to block inside a runtime), and not for
//! saving while training: that is `BackgroundSaver`, which does not block the caller.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::lease::{self, Holder, Lease};
use crate::manifest::{Manifest, ManifestMeta, StepName};
use crate::options::StoreOptions;
use crate::outdir::Leftovers;
use crate::store::{CheckpointStore, Latest, LoadedStep, RetainReport, StepInfo, VerifiedStep};

pub(crate) fn runtime(name: &str) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| Error::Internal {
            detail: format!("cannot start the {name} tokio runtime: {e}"),
        })
}

/// A `CheckpointStore` with blocking methods. Cheap to clone (shares store and runtime).
#[derive(Clone)]
pub struct BlockingCheckpointStore {
    store: CheckpointStore,
    rt: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for BlockingCheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BlockingCheckpointStore")
            .field(&self.store)
            .finish()
    }
}

impl BlockingCheckpointStore {
    /// See [`CheckpointStore::open`].
    pub fn open(out_dir: &str) -> Result<Self> {
        Self::new(CheckpointStore::open(out_dir)?)
    }

    pub fn open_with(out_dir: &str, opts: StoreOptions) -> Result<Self> {
        Self::new(CheckpointStore::open_with(out_dir, opts)?)
    }

    /// See [`CheckpointStore::resolve`].
    pub fn resolve(step_dir: &str) -> Result<(Self, StepName)> {
        let (store, step) = CheckpointStore::resolve(step_dir)?;
        Ok((Self::new(store)?, step))
    }

    /// [`Self::resolve`] with explicit options.
    pub fn resolve_with(step_dir: &str, opts: StoreOptions) -> Result<(Self, StepName)> {
        let (store, step) = CheckpointStore::resolve_with(step_dir, opts)?;
        Ok((Self::new(store)?, step))
    }

    pub fn new(store: CheckpointStore) -> Result<Self> {
        Ok(BlockingCheckpointStore {
            store,
            rt: Arc::new(runtime("mla-storage")?),
        })
    }

    /// The async store (e.g. to hand to a `BackgroundSaver`).
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// See [`CheckpointStore::probe`].
    pub fn probe(&self) -> Result<std::time::Duration> {
        self.rt.block_on(self.store.probe())
    }

    /// See [`CheckpointStore::clean_leftovers`].
    pub fn clean_leftovers(&self) -> Result<Leftovers> {
        self.rt.block_on(self.store.clean_leftovers())
    }

    /// See [`CheckpointStore::clean_leftovers_of`].
    pub fn clean_leftovers_of(&self, listed: &[StepInfo]) -> Result<Leftovers> {
        self.rt.block_on(self.store.clean_leftovers_of(listed))
    }

    /// See [`CheckpointStore::delete_all_steps`].
    pub fn delete_all_steps(&self) -> Result<Vec<StepName>> {
        self.rt.block_on(self.store.delete_all_steps())
    }

    /// Take the out_dir for `holder` (see `lease.rs`): the lock file of a local directory, or
    /// the lease object of an object store, renewed in the background on this store's
    /// runtime until the returned [`Lease`] is dropped. [`Error::Locked`] names the run that
    /// holds it.
    pub fn acquire_lease(&self, holder: &Holder) -> Result<Lease> {
        self.acquire_lease_with_ttl(holder, lease::ttl_from_env()?)
    }

    /// [`Self::acquire_lease`] with an explicit time to live (object stores; renewals every
    /// `ttl / 4`, stale after `2 × ttl`).
    pub fn acquire_lease_with_ttl(
        &self,
        holder: &Holder,
        ttl: std::time::Duration,
    ) -> Result<Lease> {
        let s = &self.store;
        match &s.local_dir {
            Some(dir) => lease::lock_local(&dir.join(s.root.as_ref()), s.url(), holder),
            None => self.rt.block_on(lease::lease_object(
                s.inner.clone(),
                s.path(lease::LEASE_OBJECT)?,
                s.url(),
                holder,
                ttl,
                Arc::clone(&self.rt),
            )),
        }
    }

    pub fn list(&self) -> Result<Vec<StepInfo>> {
        self.rt.block_on(self.store.list())
    }

    pub fn list_verified(&self) -> Result<Vec<StepInfo>> {
        self.rt.block_on(self.store.list_verified())
    }

    pub fn latest_valid(&self) -> Result<Latest<VerifiedStep>> {
        self.rt.block_on(self.store.latest_valid())
    }

    pub fn load_latest_valid(&self) -> Result<Latest<LoadedStep>> {
        self.rt.block_on(self.store.load_latest_valid())
    }

    pub fn verify(&self, step: &StepName) -> Result<Manifest> {
        self.rt.block_on(self.store.verify(step))
    }

    pub fn load_step(&self, step: &StepName) -> Result<LoadedStep> {
        self.rt.block_on(self.store.load_step(step))
    }

    pub fn read_manifest(&self, step: &StepName) -> Result<Manifest> {
        self.rt.block_on(self.store.read_manifest(step))
    }

    pub fn read_object(&self, step: &StepName, name: &str) -> Result<Bytes> {
        self.rt.block_on(self.store.read_object(step, name))
    }

    /// See [`CheckpointStore::read_object_range`].
    pub fn read_object_range(
        &self,
        step: &StepName,
        name: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        self.rt
            .block_on(self.store.read_object_range(step, name, range))
    }

    pub fn write_step(
        &self,
        step: &StepName,
        objects: &[(String, Bytes)],
        meta: ManifestMeta,
    ) -> Result<Manifest> {
        self.rt.block_on(self.store.write_step(step, objects, meta))
    }

    pub fn delete_step(&self, step: &StepName) -> Result<()> {
        self.rt.block_on(self.store.delete_step(step))
    }

    pub fn retain(&self, keep_last: usize) -> Result<RetainReport> {
        self.rt.block_on(self.store.retain(keep_last))
    }

    /// See [`CheckpointStore::retain_after_save`].
    pub fn retain_after_save(&self, keep_last: usize, saved: &StepName) -> Result<RetainReport> {
        self.rt
            .block_on(self.store.retain_after_save(keep_last, saved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_after_save_keeps_the_step_just_written() {
        let store = BlockingCheckpointStore::open("memory://").unwrap();
        for n in 1..=3 {
            let meta = ManifestMeta {
                step: n,
                ..Default::default()
            };
            let objects = [("a.bin".to_string(), Bytes::from(vec![n as u8; 8]))];
            store
                .write_step(&StepName::Step(n), &objects, meta)
                .unwrap();
        }
        let report = store.retain_after_save(1, &StepName::Step(3)).unwrap();
        assert_eq!(report.newest_valid, Some(StepName::Step(3)));
        assert_eq!(report.deleted, [StepName::Step(1), StepName::Step(2)]);
        let left: Vec<StepName> = store.list().unwrap().into_iter().map(|i| i.step).collect();
        assert_eq!(left, [StepName::Step(3)]);
    }
}
