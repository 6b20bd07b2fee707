//! `mla ckpt list|verify|inspect`: look into the checkpoints of an out_dir (a path or an
//! `s3://…` / `file://…` URL) without training: what steps exist, whether their objects still
//! match their manifests, and what a step holds (config, state, tensor names/shapes/dtypes).
//! `mla ckpt logits` (hidden) prints the checkpoint model's logits for given token ids as
//! JSON: the Rust side of the Python parity check (scripts/ref/check_safetensors_logits.py).
//!
//! Not here: writing or repairing checkpoints (checkpoint.rs and the storage crate do that).
//! Exit codes: 0 fine; 2 for a bad argument, a missing/incomplete/corrupt step (one line
//! naming the object); 1 when the store itself fails (network, permissions).

use crate::checkpoint::{
    contents, CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, TOKENIZER_FILE,
};
use crate::config::RunConfig;
use crate::error::BadInput;
use crate::metrics::human_bytes;
use crate::tensors::{safetensors_index, TensorInfo};
use anyhow::Context;
use mla_model::stats;
use mla_storage::{
    BlockingCheckpointStore, Error as StoreError, StepInfo, StoreErrorKind, StoreOptions,
    Verification,
};
use serde_json::{json, Value};
use std::fmt::Write as _;

#[derive(Debug, clap::Args)]
pub struct CkptArgs {
    #[command(subcommand)]
    command: CkptCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CkptCommand {
    /// Every step directory under an out_dir, oldest first: step, tokens, size, objects, status.
    List {
        /// out_dir: a path, file://…, or s3://bucket/prefix.
        out_dir: String,
        /// Re-read every object and check its size and sha256 (else: manifest-level status).
        #[arg(long)]
        verify: bool,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Check every object of one step against its manifest, and that the step loads (the
    /// safetensors headers parse and hold the tensors its config's model needs): exit 0 when
    /// all is well, else 2 with one line naming the bad object.
    Verify {
        /// A step directory: …/step-00000400 or …/final (path or URL).
        step_dir: String,
    },
    /// A step's config summary, state.json, and the tensors of its safetensors files.
    Inspect {
        /// A step directory: …/step-00000400 or …/final (path or URL).
        step_dir: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Diagnostic: logits of the step's model for token ids, as JSON on stdout.
    #[command(hide = true)]
    Logits {
        step_dir: String,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<i64>,
    },
}

pub fn run(args: &CkptArgs) -> anyhow::Result<()> {
    match &args.command {
        CkptCommand::List {
            out_dir,
            verify,
            json,
        } => list(out_dir, *verify, *json),
        CkptCommand::Verify { step_dir } => verify(step_dir),
        CkptCommand::Inspect { step_dir, json } => inspect(step_dir, *json),
        CkptCommand::Logits { step_dir, tokens } => logits(step_dir, tokens),
    }
}

/// The store options of these commands: a person waits on them, so an endpoint that does not
/// answer is an error within seconds (`StoreOptions::interactive`), not after the patient
/// retry budget of training saves.
fn options() -> anyhow::Result<StoreOptions> {
    StoreOptions::interactive_from_env().map_err(|e| BadInput(e.to_string()).into())
}

/// Checkpoint problems (missing, incomplete, corrupt, not a step dir) are bad input (exit 2);
/// store failures are not, and say what was tried (the network limits in force).
fn store_error(what: &str, e: StoreError) -> anyhow::Error {
    if let StoreError::Store {
        kind: StoreErrorKind::Other,
        ..
    } = &e
    {
        let limits = options().map(|o| o.limits()).unwrap_or_default();
        let e = anyhow::anyhow!("{e} (gave up with {limits})");
        return if what.is_empty() {
            e
        } else {
            e.context(what.to_string())
        };
    }
    if mla_storage::is_invalid_step(&e)
        || matches!(
            e,
            StoreError::NotAStepDir { .. }
                | StoreError::InvalidLocation { .. }
                | StoreError::InvalidEnv { .. }
        )
    {
        if what.is_empty() {
            BadInput(e.to_string()).into()
        } else {
            BadInput(format!("{what}: {e}")).into()
        }
    } else {
        anyhow::Error::new(e).context(what.to_string())
    }
}

fn resolve(step_dir: &str) -> anyhow::Result<(BlockingCheckpointStore, mla_storage::StepName)> {
    BlockingCheckpointStore::resolve_with(step_dir, options()?).map_err(|e| match e {
        StoreError::NotAStepDir { .. } => BadInput(format!(
            "{step_dir} is not a step directory (…/step-NNNNNNNN or …/final); to check every step of an out_dir run `mla ckpt list --verify {step_dir}`"
        ))
        .into(),
        e => store_error("", e),
    })
}

/// (status, reason) of a listed step.
fn status(info: &StepInfo) -> (&'static str, Option<String>) {
    match (&info.manifest, &info.verification) {
        (Some(_), Verification::Verified) => ("verified", None),
        (Some(_), Verification::NotChecked) => ("committed", None),
        (Some(_), Verification::Failed(e)) => ("invalid", Some(e.to_string())),
        (Some(_), Verification::Unloadable(why)) => ("invalid", Some(why.clone())),
        (None, _) => match &info.manifest_error {
            Some(StoreError::MissingManifest { .. }) | None => (
                "incomplete",
                Some("no manifest.json: a save in flight or interrupted; resume ignores it".into()),
            ),
            Some(e) => ("invalid", Some(e.to_string())),
        },
    }
}

fn list(out_dir: &str, verify: bool, as_json: bool) -> anyhow::Result<()> {
    // A local out_dir that does not exist is a typo, not an empty run (object stores have no
    // directories: an empty prefix there is simply empty).
    let local = out_dir.strip_prefix("file://").unwrap_or(out_dir);
    if crate::data::remote_url(out_dir).is_none() && !std::path::Path::new(local).exists() {
        return Err(BadInput(format!("{out_dir}: no such directory")).into());
    }
    let store = BlockingCheckpointStore::open_with(out_dir, options()?)
        .map_err(|e| store_error(out_dir, e))?;
    let mut infos = if verify {
        store.list_verified()
    } else {
        store.list()
    }
    .map_err(|e| store_error(&format!("listing {out_dir}"), e))?;
    if verify {
        // Checksums say the bytes are those saved; the contents check says they load.
        let mut check = contents::ContentsCheck::default();
        for info in &mut infos {
            if let (Some(m), Verification::Verified) = (&info.manifest, &info.verification) {
                if let Err(e) = check.check(&store, &info.step, m) {
                    info.verification = Verification::Unloadable(format!("{e:#}"));
                }
            }
        }
    }
    let rows: Vec<Value> = infos
        .iter()
        .map(|i| {
            let (status, reason) = status(i);
            json!({
                "dir": i.step.to_string(),
                "step": i.optimizer_step(),
                "tokens": i.tokens_seen(),
                "world_size": i.manifest.as_ref().map(|m| m.world_size),
                "size_bytes": i.total_bytes,
                "objects": i.object_count,
                "status": status,
                "reason": reason,
            })
        })
        .collect();
    if as_json {
        return emit(&serde_json::to_string_pretty(&rows)?);
    }
    let mut out = String::new();
    writeln!(out, "{}", store.url())?;
    if rows.is_empty() {
        writeln!(out, "  no step directories")?;
        return emit(&out);
    }
    writeln!(
        out,
        "  {:<15} {:>9} {:>13} {:>5} {:>11} {:>7}  status",
        "dir", "step", "tokens", "ranks", "size", "objects"
    )?;
    for (info, row) in infos.iter().zip(&rows) {
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let mut status = row["status"].as_str().unwrap_or_default().to_string();
        if let Some(reason) = row["reason"].as_str() {
            status = format!("{status}: {reason}");
        }
        writeln!(
            out,
            "  {:<15} {:>9} {:>13} {:>5} {:>11} {:>7}  {status}",
            info.step.to_string(),
            opt(info.optimizer_step()),
            opt(info.tokens_seen()),
            opt(info.manifest.as_ref().map(|m| u64::from(m.world_size))),
            human_bytes(info.total_bytes),
            info.object_count,
        )?;
    }
    let newest = |wanted: &str| {
        infos
            .iter()
            .zip(&rows)
            .rev()
            .find(|(_, r)| r["status"] == wanted)
            .map(|(i, _)| i.step.to_string())
    };
    if verify {
        match newest("verified") {
            Some(s) => writeln!(out, "resume: auto would load {s}")?,
            None => writeln!(out, "no valid checkpoint: resume: auto would start fresh")?,
        }
    } else if let Some(s) = newest("committed") {
        writeln!(
            out,
            "newest committed: {s} (checksums not read; --verify checks them, as resume does)"
        )?;
    }
    emit(&out)
}

fn verify(step_dir: &str) -> anyhow::Result<()> {
    let (store, step) = resolve(step_dir)?;
    let m = store.verify(&step).map_err(|e| store_error("", e))?;
    contents::ContentsCheck::default().check(&store, &step, &m)?;
    let mut out = String::new();
    writeln!(
        out,
        "verified {}: {} objects, {} (step {}, {} tokens)",
        store.store().step_url(&step),
        m.objects.len(),
        human_bytes(m.total_bytes()),
        m.step,
        m.tokens_seen
    )?;
    emit(&out)
}

fn tensors_json(tensors: &[TensorInfo], meta: &std::collections::HashMap<String, String>) -> Value {
    json!({ "metadata": meta, "tensors": tensors })
}

fn inspect(step_dir: &str, as_json: bool) -> anyhow::Result<()> {
    let (store, step) = resolve(step_dir)?;
    let url = store.store().step_url(&step);
    let loaded = store.load_step(&step).map_err(|e| store_error("", e))?;
    let m = &loaded.manifest;
    let text = |name: &str| {
        loaded
            .object(name)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let state: Option<Value> = match text(STATE_FILE) {
        Some(s) => Some(
            serde_json::from_str(&s)
                .map_err(|e| BadInput(format!("{url}/{STATE_FILE}: invalid JSON: {e}")))?,
        ),
        None => None,
    };
    let cfg = match text(CONFIG_FILE) {
        Some(yaml) => Some(RunConfig::from_yaml(
            &yaml,
            &format!("{url}/{CONFIG_FILE}"),
            &[],
        )?),
        None => None,
    };
    let mut files = Vec::new();
    for name in [MODEL_FILE, OPTIMIZER_FILE] {
        if let Some(bytes) = loaded.object(name) {
            let (tensors, meta) = safetensors_index(bytes, &format!("{url}/{name}"))?;
            files.push((name, tensors, meta));
        }
    }
    if as_json {
        let mut doc = json!({
            "url": url,
            "manifest": m,
            "state": state,
            "config": cfg,
            "resumes_on_world_sizes": cfg.as_ref().map(RunConfig::world_sizes),
        });
        for (name, tensors, meta) in &files {
            doc[*name] = tensors_json(tensors, meta);
        }
        return emit(&serde_json::to_string_pretty(&doc)?);
    }
    let mut out = String::new();
    writeln!(
        out,
        "{url}: verified, {} objects, {}",
        m.objects.len(),
        human_bytes(m.total_bytes())
    )?;
    writeln!(
        out,
        "  step {}, {} tokens, world size {}, created {}, config digest {}",
        m.step, m.tokens_seen, m.world_size, m.created, m.config_digest
    )?;
    if let Some(cfg) = &cfg {
        let sizes: Vec<String> = cfg.world_sizes().iter().map(|w| w.to_string()).collect();
        writeln!(
            out,
            "  resumes on {} rank(s) at micro_batch_size {} (global batch {}; another micro_batch_size that divides it allows others)",
            sizes.join(", "),
            cfg.train.micro_batch_size,
            cfg.train.global_batch_size
        )?;
    }
    for o in &m.objects {
        writeln!(
            out,
            "  {:<24} {:>11}  sha256 {}",
            o.name,
            human_bytes(o.size_bytes),
            o.sha256
        )?;
    }
    if let Some(cfg) = &cfg {
        let mc = cfg.model();
        writeln!(out, "config:")?;
        writeln!(
        out,
            "  model {}: {} attention, {} layers, n_embd {}, {} heads, block_size {}, padded vocab {}, {} parameters",
            mc.name,
            mc.attention_kind().name(),
            mc.n_layer,
            mc.n_embd,
            mc.n_head,
            mc.block_size,
            mc.padded_vocab_size(),
            stats::parameters(mc)
        )?;
        let t = &cfg.train;
        let budget = [
            t.max_steps.map(|v| format!("max_steps {v}")),
            t.max_tokens.map(|v| format!("max_tokens {v}")),
            t.epochs.map(|v| format!("epochs {v}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        writeln!(
        out,
            "  train: global_batch_size {}, micro_batch_size {}, {budget}, lr {}, seed {}, precision {}",
            t.global_batch_size,
            t.micro_batch_size,
            cfg.optimizer.init_args.lr,
            cfg.seed,
            cfg.precision.map_or("default", |p| p.as_str()),
        )?;
        writeln!(
            out,
            "  out_dir {}, tokenizer_dir {}",
            cfg.out_dir,
            cfg.tokenizer_dir.as_deref().unwrap_or("-")
        )?;
    }
    if let Some(o) = m.object(TOKENIZER_FILE) {
        writeln!(out, "  tokenizer: {TOKENIZER_FILE} sha256 {}", o.sha256)?;
    }
    if let Some(state) = &state {
        writeln!(out, "{STATE_FILE}:")?;
        for line in serde_json::to_string_pretty(state)?.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    for (name, tensors, meta) in &files {
        let mut meta: Vec<String> = meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
        meta.sort();
        writeln!(
            out,
            "{name}: {} tensors ({})",
            tensors.len(),
            meta.join(", ")
        )?;
        let width = tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in tensors {
            writeln!(out, "  {:<width$}  {:<4} {:?}", t.name, t.dtype, t.shape)?;
        }
    }
    emit(&out)
}

fn logits(step_dir: &str, tokens: &[i64]) -> anyhow::Result<()> {
    let loaded = crate::inference::load(step_dir, tch::Device::Cpu, tch::Kind::Float)?;
    let m = loaded.cfg.model();
    let vocab = m.padded_vocab_size() as i64;
    if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= vocab) {
        return Err(BadInput(format!(
            "--tokens: {bad} is not a token id of this model (0..{vocab})"
        ))
        .into());
    }
    if tokens.is_empty() || tokens.len() > m.block_size {
        return Err(BadInput(format!(
            "--tokens: {} ids given; the model takes 1 to {} (block_size)",
            tokens.len(),
            m.block_size
        ))
        .into());
    }
    let idx = tch::Tensor::from_slice(tokens).view([1, tokens.len() as i64]); // (B=1, T)
    let logits = tch::no_grad(|| loaded.model.forward(&idx)); // (1, T, V)
    let rows: Vec<Vec<f32>> = (0..tokens.len() as i64)
        .map(|i| Vec::<f32>::try_from(logits.get(0).get(i).to_kind(tch::Kind::Float)))
        .collect::<Result<_, _>>()
        .context("reading logits")?;
    emit(&json!({ "source": loaded.source, "tokens": tokens, "logits": rows }).to_string())
}

/// Print a command's whole output; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                stdout.write_all(b"\n")
            }
        })
        .and_then(|()| stdout.flush());
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
