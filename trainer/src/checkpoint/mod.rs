//! What a checkpoint holds and the save/resume policy of a run (DESIGN §6). The weights' and
//! moments' bytes are optim/state.rs's (tensor bytes in general: tensors.rs); the storage
//! crate moves the bytes and owns the manifest-last protocol.
//!
//! A step directory (`step-00000400/` or `final/`) holds:
//! * `model.safetensors` — weights under litgpt state-dict keys (`safetensors.torch.load_file`
//!   reads it; litgpt loads it without a rename table);
//! * `optimizer.safetensors` — AdamW moments per parameter (`exp_avg.<key>`,
//!   `exp_avg_sq.<key>`) and the optimizer step count in the metadata;
//! * `state.json` — [`TrainState`]: step, tokens, every rank's loader position, seed, …;
//! * `config.yaml` — the resolved run config; `tokenizer.json` (+ `tokenizer_config.json`).
//!
//! That is everything a bit-exact resume needs: the LR schedule is a function of the step and
//! the config, AdamW's bias correction of its step count, the data order of (seed, epoch,
//! position), and nothing draws random numbers after initialisation (no dropout).
//!
//! Saving ([`Saver`]): the training loop blocks only for the copy to host memory (and, when the
//! previous upload is still running, for that upload: never two saves at once); the upload runs
//! on the storage crate's `BackgroundSaver`. Each outcome is reported; a failed save either
//! lets training go on (`checkpoint.on_failure: continue`, a later save writes a new step) or
//! stops the run (`stop`). The last save is awaited before exit, and its failure is an error.
//!
//! Resuming ([`resume`]): `auto` takes the newest step whose manifest and checksums verify,
//! warning about each newer one passed over (naming the bad object); `true` requires one;
//! a path or URL names a step (or an out_dir, whose newest valid step is taken). A checkpoint
//! of another model shape or tokenizer is refused with one line and a hint (exit 2); another
//! world size or `dist.shard` resumes it: the moments are always saved whole (a sharded run
//! gathers them on rank 0 first, optim/zero.rs) and each rank takes its slice on resume.
//!
//! Not here: the manifest protocol and uploads (mla-storage), when to save (train.rs).

pub(crate) mod contents;

use crate::config::{OnSaveFailure, Resume, RunConfig};
use crate::data::LoaderPosition;
use crate::error::BadInput;
use crate::metrics::human_bytes;
use crate::optim::state::{model_bytes, optimizer_bytes, ParsedState};
use crate::optim::{AdamW, FlatParams, Moments};
use anyhow::{bail, Context};
use mla_storage::{BackgroundSaver, BlockingCheckpointStore, LoadedStep, SaveReport};
use mla_storage::{Bytes, ManifestMeta, SaveJob, StepName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tch::Tensor;
use tracing::{debug, info, warn};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.yaml";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_FILES: &[&str] = &[TOKENIZER_FILE, "tokenizer_config.json"];
pub const STATE_VERSION: u32 = 1;

/// Training progress, enough to continue bit-exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// Loader position of every rank, by rank.
    pub loaders: Vec<LoaderPosition>,
    pub world_size: usize,
    pub seed: u64,
    pub skipped_steps: u64,
    /// Training wall time before this checkpoint (for max_time across resumes).
    pub elapsed_secs: f64,
    /// Validation loss at the last evaluation, if any.
    pub last_val_loss: Option<f64>,
}

/// Digest of what defines the model's shape: resume refuses a checkpoint of another model.
pub fn config_digest(cfg: &RunConfig) -> String {
    let json = serde_json::to_vec(cfg.model()).unwrap_or_default();
    mla_storage::sha256_hex(&json)[..16].to_string()
}

/// The `model_config` fields that differ between a checkpoint's config and this run's, as
/// `key: <checkpoint> → <run>` (first few).
fn model_differences(saved_yaml: &str, cfg: &RunConfig) -> Option<Vec<String>> {
    let saved = RunConfig::from_yaml(saved_yaml, CONFIG_FILE, &[]).ok()?;
    let (a, b) = (
        serde_json::to_value(saved.model()).ok()?,
        serde_json::to_value(cfg.model()).ok()?,
    );
    let (a, b) = (a.as_object()?, b.as_object()?);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    Some(
        keys.into_iter()
            .filter(|k| a.get(*k).unwrap_or(&null) != b.get(*k).unwrap_or(&null))
            .map(|k| {
                format!(
                    "model_config.{k} is {} there, {} here",
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null)
                )
            })
            .collect(),
    )
}

/// sha256 of the run's `tokenizer.json`, if there is one.
pub fn tokenizer_sha256(tokenizer_dir: &Path) -> anyhow::Result<Option<String>> {
    let path = tokenizer_dir.join(TOKENIZER_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(mla_storage::sha256_hex(&bytes)))
}

// ---- saving -------------------------------------------------------------------------------

/// A step's objects as a job for the store, around the model and optimizer bytes.
pub fn snapshot(
    step: StepName,
    model: Bytes,
    optimizer: Bytes,
    state: &TrainState,
    cfg: &RunConfig,
    tokenizer: &[(String, Bytes)],
    keep_last: Option<usize>,
) -> anyhow::Result<SaveJob> {
    let mut objects = vec![
        (MODEL_FILE.to_string(), model),
        (OPTIMIZER_FILE.to_string(), optimizer),
        (
            STATE_FILE.to_string(),
            Bytes::from(serde_json::to_vec_pretty(state)?),
        ),
        (CONFIG_FILE.to_string(), Bytes::from(cfg.to_yaml())),
    ];
    objects.extend(tokenizer.iter().cloned());
    Ok(SaveJob {
        step,
        objects,
        meta: ManifestMeta {
            step: state.step,
            tokens_seen: state.tokens_seen,
            world_size: state.world_size as u32,
            config_digest: config_digest(cfg),
            extra: serde_json::Value::Null,
        },
        keep_last,
    })
}

/// The tokenizer files of `tokenizer_dir` that a checkpoint carries.
pub(crate) fn read_tokenizer_files(tokenizer_dir: &Path) -> anyhow::Result<Vec<(String, Bytes)>> {
    let mut out = Vec::new();
    for name in TOKENIZER_FILES {
        let path = tokenizer_dir.join(name);
        if path.exists() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.push((name.to_string(), Bytes::from(bytes)));
        }
    }
    Ok(out)
}

/// The checkpoint saves of one run (rank 0 writes; other ranks' calls are no-ops).
///
/// Keeps the last snapshot's model and optimizer buffers (≈ 3 × the parameter bytes with
/// fp32 AdamW) after their upload, to copy the next snapshot into already-mapped memory.
pub struct Saver {
    cfg: RunConfig,
    store: BlockingCheckpointStore,
    background: Option<BackgroundSaver>,
    main: bool,
    tokenizer: Vec<(String, Bytes)>,
    /// Model and optimizer bytes of the last snapshot, reused once the upload let go of them.
    spare: Option<(Bytes, Bytes)>,
    /// The step of the last save started, and whether it has been reported as failed.
    last: Option<(StepName, Option<String>)>,
    saves: u32,
    failures: u32,
    /// Saves refused because the weights were not finite.
    refused: Vec<StepName>,
    /// The run's last save has been started: no later save can make up for a failure.
    finishing: bool,
    blocked: Vec<Duration>,
    uploaded_bytes: u64,
    upload_secs: f64,
}

impl Saver {
    pub fn new(
        cfg: &RunConfig,
        store: &BlockingCheckpointStore,
        tokenizer_dir: &Path,
        main: bool,
    ) -> anyhow::Result<Saver> {
        let background = if cfg.checkpoint.async_save && main {
            Some(BackgroundSaver::new(store.store().clone())?)
        } else {
            None
        };
        Ok(Saver {
            cfg: cfg.clone(),
            store: store.clone(),
            background,
            main,
            tokenizer: if main {
                read_tokenizer_files(tokenizer_dir)?
            } else {
                Vec::new()
            },
            spare: None,
            last: None,
            saves: 0,
            failures: 0,
            refused: Vec::new(),
            finishing: false,
            blocked: Vec::new(),
            uploaded_bytes: 0,
            upload_secs: 0.0,
        })
    }

    /// Save `name`: wait for the previous upload if it still runs (never two at once), copy
    /// everything to host memory, and hand it to the background upload (or write it now when
    /// `checkpoint.async_save` is false). A second save of the same step is skipped (a stop
    /// request right after a periodic save).
    pub fn save(
        &mut self,
        name: StepName,
        flat: &FlatParams,
        opt: Moments,
        state: &TrainState,
    ) -> anyhow::Result<()> {
        if !self.main {
            return Ok(());
        }
        if self.last.as_ref().is_some_and(|(s, _)| *s == name) {
            debug!("checkpoint {name}: already saved at this step");
            return Ok(());
        }
        // The last line of defence against a diverged run: never write weights that are not
        // finite (they would replace good checkpoints under retention, and `final/` would be
        // a model of NaNs). The run ends with an error when it is over (see `finish`).
        if !all_finite(&flat.params)? {
            warn!(
                "checkpoint {name} NOT saved: the weights contain NaN or infinite values (the run diverged); earlier checkpoints are kept"
            );
            self.refused.push(name);
            return Ok(());
        }
        let t0 = Instant::now();
        if let Some(report) = self.background.as_mut().and_then(BackgroundSaver::wait) {
            self.report(&report)?;
        }
        let waited = t0.elapsed();
        let t1 = Instant::now();
        // The upload is over, so these are unique again unless a save failed half-way.
        let (model, optimizer) = match self.spare.take() {
            Some((m, o)) => (m.try_into_mut().ok(), o.try_into_mut().ok()),
            None => (None, None),
        };
        let model = model_bytes(flat, model)?.freeze();
        let optimizer = optimizer_bytes(flat, opt, optimizer)?.freeze();
        self.spare = Some((model.clone(), optimizer.clone()));
        let job = snapshot(
            name.clone(),
            model,
            optimizer,
            state,
            &self.cfg,
            &self.tokenizer,
            self.cfg.checkpoint.keep_last,
        )?;
        let copy = t1.elapsed();
        let bytes = job.total_bytes();
        self.saves += 1;
        self.last = Some((name.clone(), None));
        match &mut self.background {
            Some(bg) => {
                bg.save(job); // nothing in flight: the report was collected above
                let blocked = t0.elapsed();
                self.blocked.push(blocked);
                debug!(
                    "checkpoint {name}: training blocked {:.1} ms ({:.1} ms host copy of {}, {:.1} ms waiting for the previous upload); uploading in the background",
                    blocked.as_secs_f64() * 1e3,
                    copy.as_secs_f64() * 1e3,
                    human_bytes(bytes),
                    waited.as_secs_f64() * 1e3,
                );
            }
            None => {
                let started = Instant::now();
                let result = self.store.write_step(&job.step, &job.objects, job.meta);
                let retention = match (&result, job.keep_last) {
                    (Ok(_), Some(k)) => Some(self.store.retain_after_save(k, &name)),
                    _ => None,
                };
                let report = SaveReport {
                    step: name.clone(),
                    result,
                    retention,
                    total_bytes: bytes,
                    elapsed: started.elapsed(),
                    consecutive_failures: 0,
                };
                let blocked = t0.elapsed();
                self.blocked.push(blocked);
                debug!(
                    "checkpoint {name}: training blocked {:.1} ms (synchronous save, checkpoint.async_save: false)",
                    blocked.as_secs_f64() * 1e3
                );
                self.report(&report)?;
            }
        }
        Ok(())
    }

    /// [`Saver::save`] of the run's last checkpoint (`final/`, or the step a stop was agreed
    /// at): a failure is then reported as what it is, the loss of the run's last checkpoint.
    pub fn save_last(
        &mut self,
        name: StepName,
        flat: &FlatParams,
        opt: Moments,
        state: &TrainState,
    ) -> anyhow::Result<()> {
        self.finishing = true;
        self.save(name, flat, opt, state)
    }

    /// Report a background save that has finished (call once per step; never blocks).
    pub fn poll(&mut self) -> anyhow::Result<()> {
        if let Some(report) = self.background.as_mut().and_then(BackgroundSaver::poll) {
            self.report(&report)?;
        }
        Ok(())
    }

    /// Wait for the last save; an error if it failed (the run's last checkpoint would be lost).
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(report) = self.background.as_mut().and_then(BackgroundSaver::wait) {
            self.report(&report)?;
        }
        if let Some((step, Some(e))) = &self.last {
            bail!("the last checkpoint ({step}) was not saved: {e}");
        }
        if !self.refused.is_empty() {
            let names: Vec<String> = self.refused.iter().map(|s| s.to_string()).collect();
            bail!(
                "checkpoint(s) {} not saved: the weights were NaN or infinite (the run diverged; lower optimizer.init_args.lr or check the data); the newest finite checkpoint is kept",
                names.join(", ")
            );
        }
        if self.main && self.saves > 0 {
            let n = self.blocked.len().max(1) as f64;
            let mean = self.blocked.iter().map(Duration::as_secs_f64).sum::<f64>() / n;
            let max = self
                .blocked
                .iter()
                .map(Duration::as_secs_f64)
                .fold(0.0, f64::max);
            let throughput = if self.upload_secs > 0.0 {
                format!(
                    ", uploads {}/s",
                    human_bytes((self.uploaded_bytes as f64 / self.upload_secs) as u64)
                )
            } else {
                String::new()
            };
            info!(
                "checkpoints: {} saved, {} failed; training blocked {:.1} ms per save on average, {:.1} ms at most{throughput}",
                self.saves - self.failures,
                self.failures,
                mean * 1e3,
                max * 1e3
            );
        }
        Ok(())
    }

    fn report(&mut self, report: &SaveReport) -> anyhow::Result<()> {
        match &report.result {
            Ok(m) => {
                self.uploaded_bytes += m.total_bytes();
                self.upload_secs += report.elapsed.as_secs_f64();
                let secs = report.elapsed.as_secs_f64();
                info!(
                    "checkpoint {} saved: {} in {secs:.2} s ({}/s)",
                    report.step,
                    human_bytes(m.total_bytes()),
                    human_bytes((m.total_bytes() as f64 / secs.max(1e-9)) as u64)
                );
                match &report.retention {
                    Some(Ok(r)) if !r.deleted.is_empty() => {
                        let deleted: Vec<String> =
                            r.deleted.iter().map(|s| s.to_string()).collect();
                        info!("retention (keep_last): deleted {}", deleted.join(", "));
                    }
                    Some(Err(e)) => warn!("retention after checkpoint {}: {e}", report.step),
                    _ => {}
                }
                Ok(())
            }
            Err(e) => {
                self.failures += 1;
                if let Some((step, failed)) = &mut self.last {
                    if *step == report.step {
                        *failed = Some(e.to_string());
                    }
                }
                warn!(
                    "checkpoint {} FAILED ({} in a row): {e}",
                    report.step,
                    report.consecutive_failures.max(1)
                );
                if self.cfg.checkpoint.on_failure == OnSaveFailure::Stop {
                    bail!(
                        "checkpoint {} failed and checkpoint.on_failure is stop: {e}",
                        report.step
                    );
                }
                if !self.finishing {
                    info!("training continues (checkpoint.on_failure: continue); a later save writes a new checkpoint");
                }
                Ok(())
            }
        }
    }
}

/// Whether every element of `t` is finite (one reduction on the tensor's device).
fn all_finite(t: &Tensor) -> anyhow::Result<bool> {
    Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0)
}

// ---- resuming -----------------------------------------------------------------------------

/// A loaded step's parts, parsed.
pub struct Restored {
    pub state: TrainState,
    pub config_yaml: String,
}

/// Restore model, optimizer and state from a verified step's objects. Everything is parsed
/// and checked first and copied only when all of it is good, so a failure leaves `flat` and
/// `opt` untouched.
pub fn restore(
    objects: &BTreeMap<String, Bytes>,
    where_: &str,
    flat: &FlatParams,
    opt: &mut AdamW,
) -> anyhow::Result<Restored> {
    let get = |name: &str| {
        objects
            .get(name)
            .ok_or_else(|| BadInput(format!("{where_}: checkpoint has no {name}")))
    };
    let parsed = ParsedState::parse(
        flat,
        get(MODEL_FILE)?,
        &format!("{where_}/{MODEL_FILE}"),
        get(OPTIMIZER_FILE)?,
        &format!("{where_}/{OPTIMIZER_FILE}"),
    )?;
    let state: TrainState = serde_json::from_slice(get(STATE_FILE)?)
        .map_err(|e| BadInput(format!("{where_}/{STATE_FILE}: invalid: {e}")))?;
    if state.version != STATE_VERSION {
        return Err(BadInput(format!(
            "{where_}/{STATE_FILE}: state version {} (this mla reads {STATE_VERSION})",
            state.version
        ))
        .into());
    }
    let config_yaml = String::from_utf8_lossy(get(CONFIG_FILE)?).into_owned();
    parsed.apply(flat, opt);
    Ok(Restored { state, config_yaml })
}

/// A storage error as exit-2 input when it is about the checkpoint itself (missing, corrupt).
fn step_error(what: &str, e: mla_storage::Error) -> anyhow::Error {
    if mla_storage::is_invalid_step(&e) || matches!(e, mla_storage::Error::NotAStepDir { .. }) {
        BadInput(format!("{what}: {e}")).into()
    } else {
        anyhow::Error::new(e).context(what.to_string())
    }
}

/// Load the step `location` names: a step directory (`…/step-00000400`, `…/final`) or an
/// out_dir, whose newest valid step is taken. Returns (step URL, step).
pub(crate) fn load_location(location: &str, what: &str) -> anyhow::Result<(String, LoadedStep)> {
    match BlockingCheckpointStore::resolve(location) {
        Ok((store, step)) => {
            let loaded = store
                .load_step(&step)
                .map_err(|e| step_error(&format!("{what}: {location}"), e))?;
            Ok((store.store().step_url(&step), loaded))
        }
        Err(mla_storage::Error::NotAStepDir { .. }) => {
            let store = BlockingCheckpointStore::open(location)
                .map_err(|e| step_error(&format!("{what}: {location}"), e))?;
            let latest = store
                .load_latest_valid()
                .with_context(|| format!("{what}: {location}"))?;
            warn_skipped(what, &latest.skipped);
            let loaded = latest.found.ok_or_else(|| {
                BadInput(format!(
                    "{what}: {location} is neither a step directory (…/step-NNNNNNNN, …/final) nor an out_dir with a valid checkpoint"
                ))
            })?;
            Ok((store.store().step_url(&loaded.step), loaded))
        }
        Err(e) => Err(step_error(&format!("{what}: {location}"), e)),
    }
}

fn warn_skipped(what: &str, skipped: &[mla_storage::SkippedStep]) {
    for s in skipped {
        warn!("{what}: skipping checkpoint {}: {}", s.step, s.reason);
    }
}

/// Refuse a checkpoint this run cannot continue: another model (embedding tying included) or
/// tokenizer. Another world size is not one: the state is the same on any (issue 15).
fn check_compatible(
    cfg: &RunConfig,
    loaded: &LoadedStep,
    url: &str,
    tokenizer_dir: &Path,
) -> anyhow::Result<()> {
    let saved = loaded
        .object(CONFIG_FILE)
        .and_then(|b| RunConfig::from_yaml(&String::from_utf8_lossy(b), CONFIG_FILE, &[]).ok());
    if let Some(saved) = &saved {
        let (there, here) = (saved.model().tie_embeddings, cfg.model().tie_embeddings);
        if there != here {
            return Err(BadInput(format!(
                "resume: {url} was trained with train.tie_embeddings {there}, this run has {here}; use the checkpoint's setting (its config.yaml)"
            ))
            .into());
        }
    }
    if loaded.manifest.config_digest != config_digest(cfg) {
        let yaml = loaded
            .object(CONFIG_FILE)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        let diff = match model_differences(&yaml, cfg) {
            Some(d) if !d.is_empty() => {
                let more = if d.len() > 2 {
                    format!(" (and {} more)", d.len() - 2)
                } else {
                    String::new()
                };
                format!("{}{more}", d[..d.len().min(2)].join("; "))
            }
            _ => format!(
                "config digest {} there, {} here",
                loaded.manifest.config_digest,
                config_digest(cfg)
            ),
        };
        return Err(BadInput(format!(
            "resume: {url} holds another model ({diff}); use the checkpoint's model_config (its config.yaml), or set resume: false / another out_dir to start a new run"
        ))
        .into());
    }
    let saved_tok = loaded.manifest.object(TOKENIZER_FILE).map(|o| &o.sha256);
    match (saved_tok, tokenizer_sha256(tokenizer_dir)?) {
        (Some(saved), Some(ours)) if !saved.eq_ignore_ascii_case(&ours) => {
            return Err(BadInput(format!(
                "resume: {url} was trained with another tokenizer ({TOKENIZER_FILE} sha256 {}… there, {}… in tokenizer_dir {}); point tokenizer_dir at the tokenizer the run started with (a copy is in {url}/{TOKENIZER_FILE})",
                &saved[..12.min(saved.len())],
                &ours[..12],
                tokenizer_dir.display()
            ))
            .into());
        }
        (None, _) => warn!("resume: {url} carries no {TOKENIZER_FILE}; cannot check the tokenizer"),
        _ => {}
    }
    Ok(())
}

/// Restore the newest step of `store` that verifies and loads, newest first: a step without a
/// valid manifest, with an object that fails its checksum, or whose objects verify but do not
/// load (an unparsable safetensors, a missing tensor) is passed over with a warning naming
/// why, and the one before it is tried (issue 14: one bad step must not stop a resume, nor
/// burn every restart of `mla-launch --max-restarts`). A step of another model or tokenizer is
/// refused (exit 2): an older step of the same run would be no different.
/// Returns the step restored (URL and state) and how many were passed over.
fn restore_newest(
    cfg: &RunConfig,
    store: &BlockingCheckpointStore,
    flat: &FlatParams,
    opt: &mut AdamW,
    tokenizer_dir: &Path,
) -> anyhow::Result<(Option<(String, Restored)>, usize)> {
    let steps = store
        .list()
        .with_context(|| format!("resume: reading {}", store.url()))?;
    let mut skipped = 0;
    for info in steps.iter().rev() {
        let url = store.store().step_url(&info.step);
        let loaded = match &info.manifest_error {
            Some(e) => Err(e.to_string()),
            None => match store.load_step(&info.step) {
                Ok(l) => Ok(l),
                Err(e) if mla_storage::is_invalid_step(&e) => Err(e.to_string()),
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("resume: reading {url}")))
                }
            },
        };
        let why = match loaded {
            Ok(l) => {
                check_compatible(cfg, &l, &url, tokenizer_dir)?;
                match restore(&l.objects, &url, flat, opt) {
                    Ok(r) => return Ok((Some((url, r)), skipped)),
                    Err(e) => format!("its objects verify but do not load: {e:#}"),
                }
            }
            Err(why) => why,
        };
        warn!("resume: skipping checkpoint {}: {why}", info.step);
        skipped += 1;
    }
    Ok((None, skipped))
}

/// Apply `resume`; returns the restored state when resuming (`None`: the run starts fresh,
/// from `initial_checkpoint_dir`'s weights when set, train/initial.rs).
pub(crate) fn resume(
    cfg: &RunConfig,
    store: &BlockingCheckpointStore,
    flat: &FlatParams,
    opt: &mut AdamW,
    world_size: usize,
    tokenizer_dir: &Path,
) -> anyhow::Result<Option<Restored>> {
    let restored = match &cfg.resume {
        Resume::No => None,
        Resume::Auto | Resume::Latest => {
            let (found, skipped) = restore_newest(cfg, store, flat, opt, tokenizer_dir)?;
            match found {
                Some(found) => Some(found),
                None if cfg.resume == Resume::Latest => {
                    return Err(BadInput(format!(
                        "resume: true but {} holds no valid checkpoint (use resume: auto to start fresh when there is none)",
                        store.url()
                    ))
                    .into())
                }
                None => {
                    if skipped == 0 {
                        info!(
                            "resume: auto — no checkpoint under {}, starting fresh",
                            store.url()
                        );
                    } else {
                        warn!(
                            "resume: auto — none of the {skipped} step directories under {} is a valid checkpoint, starting fresh",
                            store.url()
                        );
                    }
                    None
                }
            }
        }
        Resume::Path(p) => {
            let (url, l) = load_location(p, "resume")?;
            check_compatible(cfg, &l, &url, tokenizer_dir)?;
            Some((url.clone(), restore(&l.objects, &url, flat, opt)?))
        }
    };
    if let Some((url, restored)) = restored {
        info!(
            "resume: loaded {url} (step {}, {} tokens)",
            restored.state.step, restored.state.tokens_seen
        );
        let saved_world = restored.state.world_size;
        if saved_world != world_size {
            info!(
                "resume: {url} was saved by {saved_world} rank(s), this run has {world_size}: the step, schedule, optimizer state and global batches carry over; sums run in another order, so losses agree to rounding, not bit for bit"
            );
        }
        let saved_batch = restored
            .state
            .loaders
            .first()
            .map(|p| p.global_batch_windows);
        let batch = cfg.train.global_batch_size as u64;
        if let Some(saved_batch) = saved_batch.filter(|&b| b != batch) {
            warn!(
                "resume: {url} was trained with train.global_batch_size {saved_batch}, this run has {batch}: the data position carries over, but the global batches and the schedule from here are not the straight run's"
            );
        }
        if let Some(dir) = &cfg.initial_checkpoint_dir {
            info!("initial_checkpoint_dir {dir} ignored: resuming from {url}");
        }
        return Ok(Some(restored));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::state::tests::flat_of;
    use tch::Kind;

    #[test]
    fn non_finite_weights_are_never_saved_and_the_run_ends_in_an_error() {
        let flat = flat_of(&[("w", &[3, 4]), ("b", &[4])], Kind::Float);
        let opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        let cfg = RunConfig::from_yaml("model_name: pythia-14m\n", "t.yaml", &[]).unwrap();
        let store = BlockingCheckpointStore::open("memory://").unwrap();
        let no_tokenizer = tempfile::tempdir().unwrap();
        let mut saver = Saver::new(&cfg, &store, no_tokenizer.path(), true).unwrap();
        let state = |step| TrainState {
            version: STATE_VERSION,
            step,
            tokens_seen: 0,
            loaders: Vec::new(),
            world_size: 1,
            seed: 1,
            skipped_steps: 0,
            elapsed_secs: 0.0,
            last_val_loss: None,
        };
        saver
            .save(StepName::Step(1), &flat, opt.moments(), &state(1))
            .unwrap();
        let _ = flat.params.narrow(0, 5, 1).fill_(f64::NAN);
        saver
            .save(StepName::Step(2), &flat, opt.moments(), &state(2))
            .unwrap();
        let _ = flat.params.narrow(0, 5, 1).fill_(f64::INFINITY);
        saver
            .save_last(StepName::Final, &flat, opt.moments(), &state(3))
            .unwrap();
        let err = saver.finish().unwrap_err().to_string();
        assert!(
            err.contains("step-00000002, final not saved") && err.contains("NaN or infinite"),
            "{err}"
        );
        let saved: Vec<String> = store
            .list()
            .unwrap()
            .iter()
            .filter(|s| s.exists())
            .map(|s| s.step.to_string())
            .collect();
        assert_eq!(
            saved,
            ["step-00000001"],
            "only the finite step is on storage"
        );
    }
}
