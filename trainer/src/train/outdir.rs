//! Taking charge of the out_dir before any work (issue 14), on rank 0, in this order:
//! 1. **probe** it (write, read back, delete a small object, with the interactive network
//!    limits): a bad path, bucket, endpoint or credentials stops the run in seconds, not at the
//!    first save hours later;
//! 2. take its **lease** (storage `lease.rs`): a second run on the same out_dir is refused
//!    with the holder named, instead of silently replacing the first one's checkpoints;
//! 3. refuse a **fresh run** (`resume: false`) into an out_dir that holds another run's
//!    checkpoints, unless `--overwrite`, which deletes them first;
//! 4. remove the **leftovers** of crashed or failed saves (step directories without a
//!    manifest, local staging files), which only this run can still see as garbage.
//!
//! Not here: the lease protocol, the probe and the clean-up themselves (mla-storage).

use crate::config::{Resume, RunConfig};
use crate::error::BadInput;
use mla_storage::{
    BlockingCheckpointStore, Error as StoreError, Holder, Lease, StoreErrorKind, StoreOptions,
};
use tracing::{debug, info, warn};

/// The environment variable that names a run across its processes (mla-launch sets it, the
/// same across restarts).
pub(crate) const RUN_ID_VAR: &str = "MLA_RUN_ID";

/// Probe, lease, fresh-run check and clean-up of `store` (this run's out_dir); the returned
/// lease keeps other runs out until it is dropped.
pub(crate) fn claim(cfg: &RunConfig, store: &BlockingCheckpointStore) -> anyhow::Result<Lease> {
    let url = store.url().to_string();
    let quick = StoreOptions::interactive_from_env()?;
    let elapsed = BlockingCheckpointStore::open_with(&url, quick.clone())
        .and_then(|probe| probe.probe())
        .map_err(|e| {
            // Say what was tried when the endpoint did not answer (not for a plain refusal).
            let tried = match &e {
                StoreError::Store {
                    kind: StoreErrorKind::Other,
                    ..
                } => format!("; {}", quick.limits()),
                _ => String::new(),
            };
            BadInput(format!(
                "out_dir {url}: checkpoints cannot be saved there (checked before training{tried}): {e}"
            ))
        })?;
    debug!(
        "out_dir {url}: write/read/delete probe in {:.0} ms",
        elapsed.as_secs_f64() * 1e3
    );

    let run_id = std::env::var(RUN_ID_VAR)
        .ok()
        .filter(|v| !v.trim().is_empty());
    let lease = store
        .acquire_lease(&Holder::this_process(run_id.as_deref()))
        .map_err(|e| -> anyhow::Error {
            match e {
                StoreError::Locked { .. } => BadInput(format!(
                    "out_dir {e}; wait for that run to end, or use another out_dir"
                ))
                .into(),
                // The lock file cannot be opened: a link or a FIFO in its place, no permission.
                StoreError::Open { detail, .. } => {
                    BadInput(format!("out_dir {url}: taking its lease: {detail}")).into()
                }
                e => anyhow::Error::new(e).context(format!("out_dir {url}: taking its lease")),
            }
        })?;

    // One listing serves the fresh-run check and the clean-up (an --overwrite empties it).
    let mut listed = store
        .list()
        .map_err(|e| anyhow::Error::new(e).context(format!("out_dir {url}: listing")))?;
    if cfg.resume == Resume::No {
        let committed: Vec<String> = listed
            .iter()
            .filter(|s| s.exists())
            .map(|s| s.step.to_string())
            .collect();
        if !committed.is_empty() {
            if !cfg.checkpoint.overwrite {
                return Err(BadInput(format!(
                    "out_dir {url} holds the checkpoints of an earlier run ({}); use --resume auto to continue it, another out_dir, or --overwrite to replace it",
                    list_steps(&committed)
                ))
                .into());
            }
            if let Some(init) = initial_checkpoint_inside(cfg, &url) {
                return Err(BadInput(format!(
                    "--overwrite would delete initial_checkpoint_dir {init}, which is inside out_dir {url}; copy it elsewhere first, or use another out_dir"
                ))
                .into());
            }
            let deleted = store.delete_all_steps().map_err(|e| {
                anyhow::Error::new(e).context(format!("out_dir {url}: --overwrite"))
            })?;
            warn!(
                "--overwrite: deleted the earlier run's {} checkpoint(s) in {url} ({})",
                committed.len(),
                list_steps(&deleted.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            );
            listed.clear();
        }
    }

    let left = store
        .clean_leftovers_of(&listed)
        .map_err(|e| anyhow::Error::new(e).context(format!("out_dir {url}: cleaning up")))?;
    if !left.is_empty() {
        let steps: Vec<String> = left
            .incomplete_steps
            .iter()
            .map(|s| s.to_string())
            .collect();
        info!(
            "out_dir {url}: removed what crashed saves left: {} incomplete step director{}{}, {} partial upload file(s)",
            steps.len(),
            if steps.len() == 1 { "y" } else { "ies" },
            if steps.is_empty() {
                String::new()
            } else {
                format!(" ({})", list_steps(&steps))
            },
            left.staging_files
        );
    }
    Ok(lease)
}

/// `initial_checkpoint_dir` when it lies inside the out_dir `url` (canonical URLs compared).
fn initial_checkpoint_inside(cfg: &RunConfig, url: &str) -> Option<String> {
    let init = cfg.initial_checkpoint_dir.as_deref()?;
    let init_url = mla_storage::check_location(init).ok()?;
    let inside = init_url == url
        || init_url
            .strip_prefix(url)
            .is_some_and(|rest| rest.starts_with('/'));
    inside.then(|| init.to_string())
}

/// `step-00000040, step-00000080 and final` (the first few and a count beyond).
fn list_steps(steps: &[String]) -> String {
    const SHOWN: usize = 4;
    match steps.len() {
        0 => "none".into(),
        1 => steps[0].clone(),
        n if n <= SHOWN => format!("{} and {}", steps[..n - 1].join(", "), steps[n - 1]),
        n => format!("{}, … {} more", steps[..SHOWN].join(", "), n - SHOWN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lists_read_as_english() {
        let s = |v: &[&str]| list_steps(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["final"]), "final");
        assert_eq!(s(&["a", "b", "final"]), "a, b and final");
        assert_eq!(s(&["1", "2", "3", "4", "5", "6"]), "1, 2, 3, 4, … 2 more");
    }
}
