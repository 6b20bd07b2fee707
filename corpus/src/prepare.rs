//! `mla prepare`: raw text → token shards. One reader thread streams stories (decompressing
//! archives), a rayon pool tokenizes each batch in parallel, and the main thread appends the
//! ids in input order to the [`DatasetWriter`], so the output does not depend on thread count.
//!
//! Output: a local directory, or an object-store prefix (`--out s3://bucket/prefix`, written
//! through [`RemoteDir`]).
//!
//! Distributed preparation: with `--worker I/N` every worker plans the whole input (the same
//! jobs and validation choice everywhere) and reads only its contiguous share of the jobs,
//! writing worker-named shards and a partial index; `merge.rs` joins the partial indexes.
//!
//! A stop request (`PrepareArgs::stop`; the binary's SIGTERM/SIGINT flag) stops the reader between batches and the
//! tokenizer threads between stories; the shards written so far are removed and no index is
//! written, so an interrupted preparation never looks like a dataset ([`DataError::Interrupted`]).
//!
//! Not here: the CLI entry point and the YAML `data:` mapping (the binary mounts
//! [`PrepareArgs`]).

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::batch::Event;
use super::error::DataError;
use super::format::{DatasetIndex, Split, TokenizerInfo, Worker};
use super::hub::{self, HubDataset};
use super::input;
use super::remote::{remote_url, RemoteDir};
use super::store::{LocalDir, ShardSink};
use super::tokenizer::Tokenizer;
use super::writer::{DatasetWriter, DEFAULT_SHARD_TOKENS};

/// `--max-story-bytes`' default: 64 MiB, hundreds of times a long story.
pub const DEFAULT_MAX_STORY_BYTES: u64 = 64 << 20;

/// `--val-split`'s default.
const DEFAULT_VAL_SPLIT: &str = "validation";

/// Arguments of `mla prepare` (also the options of [`prepare`]).
#[derive(clap::Args, Clone, Debug)]
pub struct PrepareArgs {
    /// Training inputs: .txt/.json/.jsonl files, also gzip- or zstd-compressed (.jsonl.gz,
    /// .json.zst, ...), .parquet files (one string column, see --text-column), .tar.gz archives
    /// of the text files, or directories of all of these. Without --val, one data file among
    /// them becomes validation data: the first .parquet named validation* (or in a validation/
    /// directory, as Hugging Face datasets have it), else the first .json list (also
    /// compressed), else the first data file.
    #[arg(required_unless_present_any = ["hf_dataset", "merge"], value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// A dataset on the Hugging Face hub (OWNER/NAME): the Parquet files of --split (and of
    /// --val-split, for validation) are downloaded through HF_ENDPOINT into --cache-dir once
    /// and read as inputs (after any INPUT given).
    #[arg(long, value_name = "OWNER/NAME")]
    pub hf_dataset: Option<String>,
    /// The hub dataset's subset (its config name).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "default",
        requires = "hf_dataset"
    )]
    pub subset: String,
    /// The hub dataset's split to train on.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "train",
        requires = "hf_dataset"
    )]
    pub split: String,
    /// The hub dataset's split for validation; `none` for no validation split (then the usual
    /// rule picks one file). A dataset without this split is prepared without it (a note says
    /// so) when the name is the default.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_VAL_SPLIT, requires = "hf_dataset")]
    pub val_split: String,
    /// Where hub datasets are downloaded (<dir>/<owner>/<name>/<subset>/<split>/).
    #[arg(long, value_name = "DIR", default_value = ".cache/mla/datasets")]
    pub cache_dir: PathBuf,
    /// Validation inputs (same kinds as INPUT); repeat for several.
    #[arg(long = "val", value_name = "PATH")]
    pub val: Vec<PathBuf>,
    /// Directory with tokenizer.json (and optionally tokenizer_config.json). With --merge it is
    /// optional: when given, every worker must have used this tokenizer.
    #[arg(long, value_name = "DIR", required_unless_present = "merge")]
    pub tokenizer_dir: Option<PathBuf>,
    /// Output directory for shards and index.json (not inside an input directory), or an
    /// object-store prefix: s3://bucket/prefix (credentials from the AWS environment).
    #[arg(long, value_name = "DIR|URL", required_unless_present = "merge")]
    pub out: Option<PathBuf>,
    /// Run as worker I of N (0 <= I < N) of a distributed preparation into a shared --out:
    /// every worker plans the same inputs (and the same validation file) and tokenizes only
    /// its contiguous share of the input files (an archive counts as one), writing shards
    /// named train-wIIII-NNNNN.bin and index-worker-IIII.json instead of index.json. When all
    /// N are done, `mla prepare --merge DIR` writes index.json. --overwrite replaces only this
    /// worker's files (and a merged index.json, which lists them).
    #[arg(long, value_name = "I/N")]
    pub worker: Option<String>,
    /// Join the partial indexes of `mla prepare --worker I/N` runs in DIR (a directory or
    /// s3:// prefix) into DIR/index.json, after checking that all N workers finished and agree
    /// (tokenizer, dtype, format). Shards stay where the workers wrote them.
    #[arg(
        long,
        value_name = "DIR|URL",
        conflicts_with_all = [
            "inputs", "worker", "hf_dataset", "val", "out", "shard_tokens", "max_story_bytes", "threads",
            "text_column", "subset", "split", "val_split", "cache_dir",
        ]
    )]
    pub merge: Option<PathBuf>,
    /// Maximum tokens per shard; at least 65536 (2^16, 128 KiB of u16 ids): every shard is one
    /// more file or object to open, hash, list in the index and read across, so tiny shards
    /// only multiply that cost (--shard-tokens 1 writes one file per token).
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: u64,
    /// The longest story read, in bytes: a .txt story (its line breaks counted), a .jsonl line,
    /// the JSON text of a .json list element or a Parquet value. A longer one stops preparation
    /// with an error naming the file and where the story starts, before it is held in memory
    /// (memory grows with this limit, never with the input).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_STORY_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_story_bytes: u64,
    /// Tokenizer threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// The string column of Parquet inputs that holds the text [default: `text`, or `story`
    /// when a file has no `text` column].
    #[arg(long, value_name = "NAME")]
    pub text_column: Option<String>,
    /// Replace an existing prepared dataset in --out (with --worker: this worker's part; with
    /// --merge: an existing index.json).
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bar or progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Polled between batches and before each story: returning true stops the preparation
    /// with [`DataError::Interrupted`] (the `mla` binary passes its SIGTERM/SIGINT flag).
    /// None never stops. Not a command-line flag.
    #[arg(skip)]
    pub stop: Option<fn() -> bool>,
}

impl PrepareArgs {
    /// Options with defaults for everything but the paths.
    pub fn new(
        inputs: Vec<PathBuf>,
        tokenizer_dir: impl Into<PathBuf>,
        out: impl Into<PathBuf>,
    ) -> Self {
        Self {
            inputs,
            val: Vec::new(),
            tokenizer_dir: Some(tokenizer_dir.into()),
            out: Some(out.into()),
            worker: None,
            merge: None,
            hf_dataset: None,
            subset: "default".into(),
            split: "train".into(),
            val_split: DEFAULT_VAL_SPLIT.into(),
            cache_dir: PathBuf::from(".cache/mla/datasets"),
            shard_tokens: DEFAULT_SHARD_TOKENS,
            max_story_bytes: DEFAULT_MAX_STORY_BYTES,
            threads: 0,
            text_column: None,
            overwrite: false,
            quiet: true,
            stop: None,
        }
    }
}

impl PrepareArgs {
    /// `--worker I/N` parsed: None without it; an error naming `--worker` unless `N >= 1` and
    /// `I < N`.
    pub fn worker(&self) -> Result<Option<Worker>, DataError> {
        self.worker.as_deref().map(Worker::parse).transpose()
    }
}

impl Worker {
    /// Parse `I/N` (`--worker`), 0 <= I < N.
    pub fn parse(s: &str) -> Result<Self, DataError> {
        let bad = |message: String| DataError::InvalidOption {
            key: "--worker".into(),
            message,
        };
        let (i, n) = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse::<u32>().ok()?, n.trim().parse::<u32>().ok()?)))
            .ok_or_else(|| {
                bad(format!(
                    "{s:?}: expected I/N, worker I of N workers with 0 <= I < N (e.g. 0/4)"
                ))
            })?;
        if n == 0 {
            return Err(bad(format!(
                "{s:?}: N (the number of workers) must be at least 1"
            )));
        }
        if i >= n {
            return Err(bad(format!(
                "{s:?}: worker {i} of {n} does not exist; workers count from 0 to {}",
                n - 1
            )));
        }
        Ok(Worker { index: i, count: n })
    }

    /// The jobs of `jobs` (in plan order) that fall to this worker: the contiguous range
    /// `[floor(I*J/N), floor((I+1)*J/N))`, so the workers' streams, concatenated in worker order,
    /// are the single run's stream.
    pub fn jobs(self, jobs: usize) -> std::ops::Range<usize> {
        let at = |i: u32| (i as u128 * jobs as u128 / self.count as u128) as usize;
        at(self.index)..at(self.index + 1)
    }
}

/// What `prepare` did.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    /// The index that was written (a worker's partial index holds it too).
    pub index: DatasetIndex,
    /// Where it was written.
    pub location: PathBuf,
    /// Input bytes read from disk (compressed size for archives).
    pub input_bytes: u64,
    /// The data file chosen as validation data, when it was chosen automatically.
    pub auto_val: Option<String>,
    pub elapsed_secs: f64,
    /// Tokenizer threads used.
    pub threads: usize,
    /// The `--worker` this was, if any.
    pub worker: Option<Worker>,
    /// The input jobs (data files and archives, in plan order) this run read: all of them, or
    /// a worker's share.
    pub jobs: std::ops::Range<usize>,
    /// Input jobs in the whole plan.
    pub planned_jobs: usize,
}

impl PrepareReport {
    /// Tokens written to a split.
    pub fn tokens(&self, split: Split) -> u64 {
        self.index.split(split).tokens
    }

    /// Tokens (both splits) per second of wall time.
    pub fn tokens_per_sec(&self) -> f64 {
        let t = self.tokens(Split::Train) + self.tokens(Split::Val);
        t as f64 / self.elapsed_secs.max(1e-9)
    }
}

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let location = self.location.display();
        if let Some(w) = self.worker {
            if self.jobs.is_empty() {
                return write!(
                    f,
                    "worker {w} of {location}: no inputs fall to it ({} input files and \
                     archives for {} workers), wrote an empty partial index; when all {} workers \
                     are done: mla prepare --merge {location}",
                    self.planned_jobs, w.count, w.count
                );
            }
            write!(
                f,
                "worker {w} (inputs {}..{} of {}): ",
                self.jobs.start, self.jobs.end, self.planned_jobs
            )?;
        }
        write!(
            f,
            "prepared {}: {}, {:.1} s, {:.0} tokens/s on {} threads",
            self.location.display(),
            self.index.summary(),
            self.elapsed_secs,
            self.tokens_per_sec(),
            self.threads
        )?;
        if let Some(w) = self.worker {
            write!(
                f,
                "; when all {} workers are done: mla prepare --merge {location}",
                w.count
            )?;
        }
        Ok(())
    }
}

impl Tokenizer {
    /// The index's record of this tokenizer.
    pub fn info(&self) -> TokenizerInfo {
        TokenizerInfo {
            sha256: self.sha256().to_owned(),
            vocab_size: self.vocab_size(),
            separator_id: self.separator_id(),
            separator_token: self.separator_token().to_owned(),
        }
    }
}

/// Prepare into `args.out`: a local directory (after checking that it is not inside an input)
/// or an object-store URL (`s3://bucket/prefix`).
pub fn prepare(args: &PrepareArgs) -> Result<PrepareReport, DataError> {
    if args.merge.is_some() {
        return Err(DataError::InvalidOption {
            key: "--merge".into(),
            message: "merges prepared workers' output (data::merge), it prepares no inputs".into(),
        });
    }
    let required = |v: &Option<PathBuf>, key: &str, what: &str| {
        v.clone().ok_or_else(|| DataError::InvalidOption {
            key: key.into(),
            message: format!("missing: {what}"),
        })
    };
    let out = required(&args.out, "--out", "the output directory or s3:// prefix")?;
    let tokenizer_dir = required(
        &args.tokenizer_dir,
        "--tokenizer-dir",
        "the directory with tokenizer.json",
    )?;
    args.worker()?;
    let with_hub;
    let args = match &args.hf_dataset {
        Some(repo) => {
            with_hub = with_hub_inputs(args, repo)?;
            &with_hub
        }
        None => args,
    };
    let out_str = out.to_string_lossy();
    if let Some(url) = remote_url(&out_str) {
        if url.starts_with("memory://") {
            return Err(DataError::InvalidOption {
                key: "--out".into(),
                message: format!(
                    "{url}: a memory:// store lives only inside one process (library users: \
                     prepare_into a RemoteDir)"
                ),
            });
        }
        let sink = RemoteDir::open(url)?;
        let tokenizer = Tokenizer::from_dir(&tokenizer_dir)?;
        probe_remote(url, &out)?;
        return prepare_into(args, &tokenizer, &sink);
    }
    check_output_outside_inputs(&out, args.inputs.iter().chain(&args.val))?;
    check_output_dir(&out)?;
    let tokenizer = Tokenizer::from_dir(&tokenizer_dir)?;
    let created = create_output_dir(&out)?;
    let sink = LocalDir::new(&out);
    let result = prepare_into(args, &tokenizer, &sink);
    if result.is_err() && created {
        // Only removes it while empty: a failed run leaves no trace, a full directory stays.
        // Other workers' files in a shared directory keep it.
        let _ = std::fs::remove_dir(&out);
    }
    result
}

/// `args` with the Parquet files of the hub dataset `repo` (downloaded into `args.cache_dir`
/// unless there) added to the inputs: `--split` for training, `--val-split` for validation.
fn with_hub_inputs(args: &PrepareArgs, repo: &str) -> Result<PrepareArgs, DataError> {
    let opts = super::download::DownloadOptions {
        progress: !args.quiet,
        ..Default::default()
    };
    let of = |split: &str| HubDataset {
        repo: repo.to_owned(),
        subset: args.subset.clone(),
        split: split.to_owned(),
    };
    let mut out = args.clone();
    out.inputs.extend(hub::fetch_parquet(
        &of(&args.split),
        &args.cache_dir,
        &opts,
    )?);
    if args.val_split != "none" {
        match hub::fetch_parquet(&of(&args.val_split), &args.cache_dir, &opts) {
            Ok(files) => out.val.extend(files),
            // The default names a split most datasets have; one without it is no error.
            Err(DataError::Download {
                status: Some(404), ..
            }) if args.val_split == DEFAULT_VAL_SPLIT => {
                tracing::info!(
                    "{repo}: no {DEFAULT_VAL_SPLIT:?} split in subset {:?}; validation data comes from the inputs' own rule",
                    args.subset
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Write, read back and delete a small object at a remote `--out` before tokenizing anything
/// (issue 14: `--out s3://nosuchbucket/…` used to tokenize everything first), within seconds
/// (the interactive network limits).
fn probe_remote(url: &str, out: &Path) -> Result<(), DataError> {
    let bad = |e: mla_storage::Error| DataError::BadOutput {
        path: out.to_path_buf(),
        message: format!("cannot write there: {e}"),
    };
    let opts = mla_storage::StoreOptions::interactive_from_env().map_err(bad)?;
    mla_storage::BlockingCheckpointStore::open_with(url, opts)
        .and_then(|s| s.probe())
        .map_err(bad)?;
    Ok(())
}

/// Refuse an output that cannot be a directory: an existing non-directory, or a path under one.
fn check_output_dir(out: &Path) -> Result<(), DataError> {
    let bad = |message: String| DataError::BadOutput {
        path: out.to_path_buf(),
        message,
    };
    let mut existing = out;
    loop {
        match std::fs::metadata(existing) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) if existing == out => {
                return Err(bad("exists and is not a directory".into()));
            }
            Ok(_) => {
                return Err(bad(format!("{} is not a directory", existing.display())));
            }
            // Not there, or a file on the way (ENOTDIR): look at the parent.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) => {}
            Err(e) => return Err(output_error(out, e)),
        }
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => return Ok(()), // relative to the working directory, which exists
        }
    }
}

/// Create the output directory and check that files can be created in it, before any input is
/// read. Returns whether the directory was created.
fn create_output_dir(out: &Path) -> Result<bool, DataError> {
    let created = !out.is_dir();
    std::fs::create_dir_all(out).map_err(|e| output_error(out, e))?;
    tempfile::Builder::new()
        .prefix(".mla-prepare-check")
        .tempfile_in(out)
        .map_err(|e| {
            if created {
                let _ = std::fs::remove_dir(out);
            }
            output_error(out, e)
        })?;
    Ok(created)
}

/// An error creating or writing the output directory: the user's choice of location when the
/// OS says it is not allowed or not a directory, the environment otherwise (a full disk, EIO).
fn output_error(out: &Path, e: std::io::Error) -> DataError {
    use std::io::ErrorKind::*;
    match e.kind() {
        PermissionDenied | ReadOnlyFilesystem | NotADirectory | IsADirectory | AlreadyExists
        | InvalidFilename => DataError::BadOutput {
            path: out.to_path_buf(),
            message: format!("cannot write there: {e}"),
        },
        _ => DataError::io(out, e),
    }
}

/// Prepare into any [`ShardSink`] (as `args.worker` says, if set); `args.out` and
/// `args.tokenizer_dir` are not used. The caller
/// makes sure the sink is not inside an input. Stops with [`DataError::Interrupted`] when
/// `args.stop` says so.
pub fn prepare_into(
    args: &PrepareArgs,
    tokenizer: &Tokenizer,
    sink: &dyn ShardSink,
) -> Result<PrepareReport, DataError> {
    let stop = args.stop;
    prepare_until(args, tokenizer, sink, &move || stop.is_some_and(|f| f()))
}

/// [`prepare_into`] that stops when `stop` returns true. It is polled by the reader before
/// each batch of stories and by the tokenizer threads before each story, so a stop takes
/// effect within one story's tokenization.
fn prepare_until(
    args: &PrepareArgs,
    tokenizer: &Tokenizer,
    sink: &dyn ShardSink,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<PrepareReport, DataError> {
    let start = Instant::now();
    let worker = args.worker()?;
    if args.max_story_bytes == 0 {
        return Err(DataError::InvalidOption {
            key: "--max-story-bytes".into(),
            message: "0: must be at least 1".into(),
        });
    }
    // Every worker plans the whole input, so all choose the same validation data.
    let mut plan = input::plan(
        &args.inputs,
        &args.val,
        args.text_column.as_deref(),
        args.max_story_bytes,
        stop,
    )?;
    let planned_jobs = plan.jobs.len();
    let jobs = worker.map_or(0..planned_jobs, |w| w.jobs(planned_jobs));
    if worker.is_some() {
        plan.keep(jobs.clone())?;
    }
    let (info, shard_tokens, overwrite) = (tokenizer.info(), args.shard_tokens, args.overwrite);
    let mut writer = match worker {
        Some(w) => DatasetWriter::for_worker(sink, info, shard_tokens, overwrite, w)?,
        None => DatasetWriter::new(sink, info, shard_tokens, overwrite)?,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .thread_name(|i| format!("mla-tokenize-{i}"))
        .build()
        .map_err(|e| DataError::InvalidOption {
            key: "threads".into(),
            message: e.to_string(),
        })?;
    let bytes_read = Arc::new(AtomicU64::new(0));
    let mut progress = Progress::new(!args.quiet, plan.total_bytes);
    let result = tokenize(
        &plan,
        tokenizer,
        &pool,
        &mut writer,
        &bytes_read,
        &mut progress,
        stop,
    );
    progress.finish();
    // The reader also ends early on a stop, without an error: check again before committing.
    let result = match result {
        Ok(()) if stop() => Err(DataError::Interrupted),
        other => other,
    };
    if let Err(e) = result {
        writer.abandon();
        return Err(e);
    }
    let index = writer.finish()?;
    Ok(PrepareReport {
        index,
        location: {
            let index = sink.location(super::format::INDEX_FILE);
            index.parent().map(Path::to_path_buf).unwrap_or(index)
        },
        input_bytes: bytes_read.load(Ordering::Relaxed),
        auto_val: plan.auto_val,
        elapsed_secs: start.elapsed().as_secs_f64(),
        threads: pool.current_num_threads(),
        worker,
        jobs,
        planned_jobs,
    })
}

/// Stream the stories of `plan` from a reader thread, tokenize each batch on `pool` and append
/// the ids to `writer` in input order.
fn tokenize(
    plan: &input::Plan,
    tokenizer: &Tokenizer,
    pool: &rayon::ThreadPool,
    writer: &mut DatasetWriter<'_>,
    bytes_read: &Arc<AtomicU64>,
    progress: &mut Progress,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<(), DataError> {
    let (tx, rx) = mpsc::sync_channel::<Result<Event, DataError>>(4);
    std::thread::scope(|scope| -> Result<(), DataError> {
        let counter = bytes_read.clone();
        let reader = std::thread::Builder::new()
            .name("mla-prepare-read".into())
            .spawn_scoped(scope, move || {
                let mut emit = |ev| !stop() && tx.send(Ok(ev)).is_ok();
                let result = input::read_all(plan, &counter, &mut emit);
                if let Err(e) = result {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| DataError::io("mla-prepare-read thread", e))?;
        let result = (|| {
            for ev in &rx {
                match ev? {
                    Event::Source { split, name } => writer.add_source(split, name),
                    Event::Stories {
                        split,
                        stories,
                        bytes_read,
                    } => {
                        let ids: Vec<Vec<u32>> = pool.install(|| {
                            stories
                                .par_iter()
                                .map(|s| {
                                    if stop() {
                                        Err(DataError::Interrupted)
                                    } else {
                                        tokenizer.encode(s)
                                    }
                                })
                                .collect::<Result<_, _>>()
                        })?;
                        for t in &ids {
                            writer.push_story(split, t)?;
                        }
                        progress.update(
                            bytes_read,
                            writer.tokens(Split::Train) + writer.tokens(Split::Val),
                        );
                    }
                }
            }
            Ok(())
        })();
        // Dropping the receiver makes the reader's next send fail, so it stops early on error.
        drop(rx);
        // A reader that panicked ended the stream early: never commit that as a dataset.
        if let Err(panic) = reader.join() {
            std::panic::resume_unwind(panic);
        }
        result
    })
}

/// A progress bar on a terminal, a plain `tracing` line every 10 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    start: Instant,
    last_line: Instant,
    total_bytes: u64,
}

impl Progress {
    fn new(enabled: bool, total_bytes: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (enabled && terminal).then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total_bytes),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "prepare [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {msg}",
            ) {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        let now = Instant::now();
        Self {
            bar,
            plain: enabled && !terminal,
            start: now,
            last_line: now,
            total_bytes,
        }
    }

    fn update(&mut self, bytes: u64, tokens: u64) {
        let rate = tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
            bar.set_message(format!("{tokens} tokens, {rate:.0} tokens/s"));
        } else if self.plain && self.last_line.elapsed() >= Duration::from_secs(10) {
            self.last_line = Instant::now();
            tracing::info!(
                "prepare: {:.1}% of {} input bytes, {tokens} tokens, {rate:.0} tokens/s",
                100.0 * bytes as f64 / self.total_bytes.max(1) as f64,
                self.total_bytes
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Absolute, `.`/`..`-free form of a path that may not exist yet (symlinks of its existing
/// prefix resolved).
fn normalize(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for c in rest.iter().rev() {
        match Path::new(c).components().next() {
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::CurDir) | None => {}
            _ => out.push(c),
        }
    }
    out
}

/// Refuse an output equal to or inside an input directory, or equal to an input file's directory.
pub fn check_output_outside_inputs<'a>(
    out: &Path,
    inputs: impl IntoIterator<Item = &'a PathBuf>,
) -> Result<(), DataError> {
    let out_n = normalize(out);
    for input in inputs {
        if !input.exists() {
            return Err(DataError::MissingInput {
                path: input.clone(),
            });
        }
        let inp = normalize(input);
        let clash = if inp.is_dir() {
            out_n.starts_with(&inp)
        } else {
            inp.parent().is_some_and(|p| out_n == p)
        };
        if clash {
            return Err(DataError::OutputInsideInput {
                out: out.to_path_buf(),
                input: input.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::format::INDEX_FILE;
    use super::*;

    #[test]
    fn output_inside_input_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("a.txt"), "x").unwrap();
        let inputs = [data.clone()];
        for bad in [data.clone(), data.join("shards"), data.join("x/../y")] {
            let e = check_output_outside_inputs(&bad, &inputs).unwrap_err();
            assert!(matches!(e, DataError::OutputInsideInput { .. }), "{bad:?}");
        }
        check_output_outside_inputs(&dir.path().join("out"), &inputs).unwrap();
        let file = [data.join("a.txt")];
        assert!(check_output_outside_inputs(&data, &file).is_err());
        check_output_outside_inputs(&data.join("sub"), &file).unwrap();
    }

    /// A [`LocalDir`] that records every object put and asks for a stop after the first one.
    struct StopAfterFirstPut {
        dir: LocalDir,
        put: std::sync::Mutex<Vec<String>>,
    }

    impl ShardSink for StopAfterFirstPut {
        fn put(&self, name: &str, bytes: &[u8]) -> Result<(), DataError> {
            self.put.lock().unwrap().push(name.to_owned());
            self.dir.put(name, bytes)
        }
        fn exists(&self, name: &str) -> Result<bool, DataError> {
            self.dir.exists(name)
        }
        fn remove(&self, name: &str) -> Result<(), DataError> {
            self.dir.remove(name)
        }
        fn location(&self, name: &str) -> PathBuf {
            self.dir.location(name)
        }
    }

    #[test]
    fn a_stop_during_tokenization_removes_the_shards_and_writes_no_index() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
        let tokenizer = Tokenizer::from_dir(shared.join("tokenizers/gpt2")).unwrap();
        // 3.5 MB: two reader batches, so the stop lands between and within batches.
        let input = shared.join("tinystories/train/tinystories_random_sample_00.txt");
        let out = tempfile::tempdir().unwrap();
        let sink = StopAfterFirstPut {
            dir: LocalDir::new(out.path()),
            put: Default::default(),
        };
        let mut args = PrepareArgs::new(vec![input], "unused", out.path());
        args.shard_tokens = 1000;
        let polls = AtomicU64::new(0);
        let stop = || {
            polls.fetch_add(1, Ordering::Relaxed);
            !sink.put.lock().unwrap().is_empty()
        };
        let e = prepare_until(&args, &tokenizer, &sink, &stop).unwrap_err();
        assert!(matches!(e, DataError::Interrupted), "{e}");
        let put = sink.put.lock().unwrap().clone();
        assert!(put.iter().any(|n| n == "train-00000.bin"), "{put:?}");
        assert!(!put.iter().any(|n| n == INDEX_FILE), "{put:?}");
        let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
        assert!(left.is_empty(), "shards left behind: {left:?}");
        // Polled per story, not once per batch (one batch holds thousands of stories).
        assert!(polls.load(Ordering::Relaxed) > 100);
    }

    #[test]
    fn output_that_is_or_lies_under_a_file_is_bad_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = check_output_dir(&file).unwrap_err();
        assert!(matches!(e, DataError::BadOutput { .. }), "{e}");
        assert!(e.is_bad_input());
        let e = check_output_dir(&file.join("a/b")).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} is not a directory", file.display())),
            "{e}"
        );
        check_output_dir(&dir.path().join("new/sub")).unwrap();
        check_output_dir(Path::new("relative-new-dir")).unwrap();
    }

    #[test]
    fn an_output_directory_that_refuses_files_is_bad_output() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        // root (CAP_DAC_OVERRIDE) writes through mode bits: only the mapping can be checked.
        if std::fs::write(locked.join("probe"), "x").is_ok() {
            eprintln!("skipping the mode 0o555 case: this user can write into it (root)");
        } else {
            for out in [locked.clone(), locked.join("sub")] {
                let e = create_output_dir(&out).unwrap_err();
                assert!(matches!(e, DataError::BadOutput { .. }), "{e}");
            }
        }
        for kind in [
            std::io::ErrorKind::PermissionDenied,
            std::io::ErrorKind::ReadOnlyFilesystem,
        ] {
            let e = output_error(&locked, kind.into());
            assert!(matches!(e, DataError::BadOutput { .. }), "{e}");
        }
        let full = output_error(&locked, std::io::ErrorKind::StorageFull.into());
        assert!(
            !full.is_bad_input(),
            "a full disk is not the user's input: {full}"
        );
    }

    #[test]
    fn worker_shares_are_contiguous_and_cover_every_job_once() {
        for jobs in 0..20 {
            for count in 1..10 {
                let mut next = 0;
                for index in 0..count {
                    let r = Worker { index, count }.jobs(jobs);
                    assert_eq!(r.start, next, "{index}/{count} of {jobs}");
                    next = r.end;
                }
                assert_eq!(next, jobs);
            }
        }
        assert_eq!(Worker { index: 3, count: 8 }.jobs(10), 3..5);
    }

    #[test]
    fn worker_parses_i_of_n_and_names_the_flag_otherwise() {
        assert_eq!(Worker::parse("3/8").unwrap(), Worker { index: 3, count: 8 });
        assert_eq!(Worker::parse("0/1").unwrap(), Worker { index: 0, count: 1 });
        for bad in ["2/2", "0/0", "a/b", "1", "", "1/2/3", "-1/2", "1/"] {
            let e = Worker::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid --worker: "), "{e}");
        }
    }

    #[test]
    fn max_story_bytes_defaults_to_64_mib_and_is_at_least_one() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            prepare: PrepareArgs,
        }
        let base = ["mla", "in.txt", "--tokenizer-dir", "tok", "--out", "o"];
        let cli = Cli::try_parse_from(base).unwrap();
        assert_eq!(cli.prepare.max_story_bytes, 64 << 20);
        assert_eq!(
            PrepareArgs::new(vec![], "tok", "o").max_story_bytes,
            64 << 20
        );
        let cli = Cli::try_parse_from(base.iter().chain(&["--max-story-bytes", "100"])).unwrap();
        assert_eq!(cli.prepare.max_story_bytes, 100);
        assert!(Cli::try_parse_from(base.iter().chain(&["--max-story-bytes", "0"])).is_err());
    }

    #[test]
    fn missing_input_is_named() {
        let e = check_output_outside_inputs(Path::new("/tmp/o"), &[PathBuf::from("/no/such")])
            .unwrap_err();
        assert_eq!(e.to_string(), "input not found: /no/such");
    }
}
