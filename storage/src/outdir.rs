//! Taking charge of an out_dir at the start of a run (issue 14): prove the location works
//! before any work ([`CheckpointStore::probe`]), clear what crashed saves left behind
//! ([`CheckpointStore::clean_leftovers`]) and, on explicit request, remove a previous run's
//! checkpoints ([`CheckpointStore::delete_all_steps`]). The lease that keeps other runs out
//! is in `lease.rs`.
//!
//! Not here: the decision to refuse or overwrite (the trainer's), the manifest protocol
//! (`store.rs`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};
use crate::local::remove_staging_files;
use crate::manifest::StepName;
use crate::store::{CheckpointStore, StepInfo};

/// What [`CheckpointStore::clean_leftovers`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Step directories without a manifest: saves that crashed or failed half-way.
    pub incomplete_steps: Vec<StepName>,
    /// Local disk: staging files of uploads cut off (`model.safetensors#3`).
    pub staging_files: usize,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.incomplete_steps.is_empty() && self.staging_files == 0
    }
}

impl CheckpointStore {
    /// Write, read back and delete a small object under the out_dir: proof that the location,
    /// bucket and credentials work, in seconds, before a run spends hours with nowhere to
    /// save. Returns how long the round trip took.
    pub async fn probe(&self) -> Result<Duration> {
        let started = Instant::now();
        let name = format!(
            ".mla-probe-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        );
        let path = self.path(&name)?;
        let body = Bytes::from(format!("mla probe {name}\n"));
        self.inner
            .put(&path, body.clone().into())
            .await
            .map_err(|e| self.store_err("put", &name, &e))?;
        let read = async {
            let got = self.inner.get(&path).await?;
            got.bytes().await
        }
        .await;
        let deleted = self.inner.delete(&path).await;
        let read = read.map_err(|e| self.store_err("get", &name, &e))?;
        if read != body {
            return Err(Error::Open {
                url: self.url.clone(),
                detail: format!(
                    "probe object {name}: read back {} bytes that differ from the {} written",
                    read.len(),
                    body.len()
                ),
            });
        }
        deleted.map_err(|e| self.store_err("delete", &name, &e))?;
        Ok(started.elapsed())
    }

    /// Remove what crashed or failed saves left: step directories without a manifest (they
    /// can never be completed: only the run that began them would write their manifest) and,
    /// on local disk, staging files of cut-off uploads. Call it only while holding the
    /// out_dir's lease, so no save of another run is in flight.
    pub async fn clean_leftovers(&self) -> Result<Leftovers> {
        self.clean_leftovers_of(&self.list().await?).await
    }

    /// [`Self::clean_leftovers`] with the out_dir's listing already at hand (a caller that
    /// just listed it need not list it again).
    pub async fn clean_leftovers_of(&self, listed: &[StepInfo]) -> Result<Leftovers> {
        let mut out = Leftovers::default();
        for info in listed.iter().filter(|i| !i.exists()) {
            self.delete_step(&info.step).await?;
            out.incomplete_steps.push(info.step.clone());
        }
        if let Some(dir) = &self.local_dir {
            let base = dir.join(self.root.as_ref());
            if let Ok(entries) = std::fs::read_dir(&base) {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let is_step = StepName::parse(&name.to_string_lossy()).is_some();
                    if is_step && entry.file_type().is_ok_and(|t| t.is_dir()) {
                        out.staging_files += remove_staging_files(&entry.path());
                        let _ = std::fs::remove_dir(entry.path()); // only when empty
                    }
                }
            }
        }
        Ok(out)
    }

    /// Delete every step directory, committed or not (`--overwrite`: the user replaces the run
    /// that was there). Other objects under the out_dir are left alone. Returns the steps.
    pub async fn delete_all_steps(&self) -> Result<Vec<StepName>> {
        let mut deleted = Vec::new();
        for info in self.list().await? {
            self.delete_step(&info.step).await?;
            deleted.push(info.step);
        }
        if let Some(dir) = &self.local_dir {
            let base = dir.join(self.root.as_ref());
            for step in &deleted {
                let step_dir = base.join(step.to_string());
                if crate::local::is_real_dir(&step_dir) {
                    remove_staging_files(&step_dir);
                    let _ = std::fs::remove_dir(&step_dir);
                }
            }
        }
        Ok(deleted)
    }
}
