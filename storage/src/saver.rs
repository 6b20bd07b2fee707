//! `BackgroundSaver`: uploads a checkpoint on its own tokio runtime while the synchronous
//! training loop goes on. The caller hands over owned bytes (the only blocking part is making
//! them); hashing, upload, manifest and retention happen in the background.
//!
//! Contract: never two saves at once (`save` waits for the one in flight; `try_save` hands the
//! job back instead); every save ends in exactly one [`SaveReport`], delivered by `save`,
//! `try_save`, `poll` or `wait`; a failed save leaves no visible step and the next save simply
//! writes new data. Whether to keep going or stop after failures is the caller's policy
//! (`SaveReport::consecutive_failures` is there for it). Not for use inside an async context.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::blocking::runtime;
use crate::error::{Error, Result};
use crate::manifest::{Manifest, ManifestMeta, StepName};
use crate::store::{CheckpointStore, RetainReport};

/// One checkpoint to write.
#[derive(Debug, Clone)]
pub struct SaveJob {
    pub step: StepName,
    /// (object name, bytes), e.g. `("model.safetensors", …)`. `Bytes` is shared, not copied.
    pub objects: Vec<(String, Bytes)>,
    pub meta: ManifestMeta,
    /// Apply keep-last-k retention after a successful save.
    pub keep_last: Option<usize>,
}

impl SaveJob {
    pub fn total_bytes(&self) -> u64 {
        self.objects.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// How one background save ended.
#[derive(Debug, Clone)]
pub struct SaveReport {
    pub step: StepName,
    /// The committed manifest, or why the step was not committed (it is then invisible).
    pub result: Result<Manifest>,
    /// Retention after a successful save (`None` when not asked for or the save failed).
    /// A retention failure does not make the save fail.
    pub retention: Option<Result<RetainReport>>,
    pub total_bytes: u64,
    /// Wall time of the background work (upload, manifest, retention).
    pub elapsed: Duration,
    /// Failed saves in a row up to and including this one (0 when this one succeeded).
    pub consecutive_failures: u32,
}

impl SaveReport {
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }

    /// Upload throughput of a successful save, bytes per second.
    pub fn throughput_bytes_per_sec(&self) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        (self.is_ok() && secs > 0.0).then(|| self.total_bytes as f64 / secs)
    }
}

/// Background checkpoint uploads, one at a time, on a dedicated runtime.
pub struct BackgroundSaver {
    store: CheckpointStore,
    in_flight: Option<(StepName, JoinHandle<SaveReport>)>,
    consecutive_failures: u32,
    // Last field: dropped after `in_flight` (see `Drop`).
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for BackgroundSaver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundSaver")
            .field("store", &self.store)
            .field("in_flight", &self.in_flight.as_ref().map(|(s, _)| s))
            .field("consecutive_failures", &self.consecutive_failures)
            .finish()
    }
}

impl BackgroundSaver {
    pub fn new(store: CheckpointStore) -> Result<Self> {
        Ok(BackgroundSaver {
            store,
            in_flight: None,
            consecutive_failures: 0,
            rt: runtime("mla-ckpt-save")?,
        })
    }

    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// The step being uploaded, if any (finished but not yet collected counts as in flight).
    pub fn in_flight(&self) -> Option<&StepName> {
        self.in_flight.as_ref().map(|(s, _)| s)
    }

    /// True while a save runs (a finished save's report is still waiting to be collected).
    pub fn is_busy(&self) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|(_, h)| !h.is_finished())
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Start `job` in the background. If a save is still in flight this blocks until it ends
    /// (never two at once) and returns its report; also returns a finished, uncollected report.
    pub fn save(&mut self, job: SaveJob) -> Option<SaveReport> {
        let previous = self.wait();
        self.start(job);
        previous
    }

    /// Start `job` unless a save is still running, in which case the job is handed back.
    /// `Ok` carries the report of the previous save if it had finished and was not collected.
    pub fn try_save(&mut self, job: SaveJob) -> Result<Option<SaveReport>, Box<SaveJob>> {
        if self.is_busy() {
            return Err(Box::new(job));
        }
        let previous = self.wait();
        self.start(job);
        Ok(previous)
    }

    /// The report of the save in flight if it has finished (once), without blocking.
    pub fn poll(&mut self) -> Option<SaveReport> {
        if self.is_busy() {
            return None;
        }
        self.wait()
    }

    /// Block until the save in flight (if any) ends; its report if not collected yet.
    /// Call before exit so the last checkpoint is not lost.
    pub fn wait(&mut self) -> Option<SaveReport> {
        let (step, handle) = self.in_flight.take()?;
        let mut report = match self.rt.block_on(handle) {
            Ok(report) => report,
            Err(e) => SaveReport {
                step: step.clone(),
                result: Err(Error::Internal {
                    detail: format!("save of {step} panicked or was cancelled: {e}"),
                }),
                retention: None,
                total_bytes: 0,
                elapsed: Duration::ZERO,
                consecutive_failures: 0,
            },
        };
        if report.is_ok() {
            self.consecutive_failures = 0;
        } else {
            self.consecutive_failures += 1;
        }
        report.consecutive_failures = self.consecutive_failures;
        Some(report)
    }

    fn start(&mut self, job: SaveJob) {
        let store = self.store.clone();
        let step = job.step.clone();
        let handle = self.rt.spawn(async move {
            let t0 = Instant::now();
            let total_bytes = job.total_bytes();
            let result = store.write_step(&job.step, &job.objects, job.meta).await;
            // Free the caller's snapshot as soon as it is uploaded.
            drop(job.objects);
            let retention = match (&result, job.keep_last) {
                (Ok(_), Some(k)) => Some(store.retain_after_save(k, &job.step).await),
                _ => None,
            };
            SaveReport {
                step: job.step,
                result,
                retention,
                total_bytes,
                elapsed: t0.elapsed(),
                consecutive_failures: 0,
            }
        });
        self.in_flight = Some((step, handle));
    }
}

impl Drop for BackgroundSaver {
    /// Dropping the runtime would cancel an upload half-way (harmless, the step stays
    /// invisible, but the checkpoint would be lost): finish it and log the outcome instead.
    fn drop(&mut self) {
        if let Some(report) = self.wait() {
            match &report.result {
                Ok(_) => tracing::info!("checkpoint {} saved at shutdown", report.step),
                Err(e) => tracing::error!("checkpoint {} failed at shutdown: {e}", report.step),
            }
        }
    }
}
