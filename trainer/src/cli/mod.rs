//! The `mla` command line: subcommands and the litgpt-style `--section.key value` overrides.
//! Each subcommand lives in its own file; this one parses, dispatches, and maps an error to
//! the exit code (2: bad input, naming the culprit; 1: anything else).

mod bench;
mod ckpt;
mod convert;
mod download;
mod eval;
mod export;
mod generate;
mod info;
mod prepare;
mod report;
mod study;
mod train;

use crate::config::{split_overrides, Override};
use crate::error::BadInput;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mla",
    version,
    about = "Pretrain, evaluate and sample GPT models with Multi-head Latent Attention",
    after_help = "Config keys can be overridden litgpt-style after the subcommand's flags, \
                  e.g. `mla info --config cfg.yaml --model_config.n_layer 2`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Model figures for a config: parameters, FLOPs per token, KV-cache bytes per token, SDPA head dims.
    Info(info::InfoArgs),
    /// Tokenize text (.txt/.json/.jsonl, gzip/zstd-compressed, .parquet, .tar.gz, directories, a
    /// Hugging Face dataset) into token shards.
    Prepare(crate::data::PrepareArgs),
    /// Download a model (config, weights, tokenizer) or its tokenizer alone from the Hugging
    /// Face hub (litgpt layout).
    Download(download::DownloadArgs),
    /// Sample text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Validation loss and perplexity of a checkpoint on a dataset.
    Eval(eval::EvalArgs),
    /// Write a checkpoint as another program's model directory (litgpt, Hugging Face).
    Export(export::ExportArgs),
    /// Convert a trained MHA/GQA/MQA model into MLA (`--to-mla`), ready to continue pretraining.
    Convert(convert::ConvertArgs),
    /// Train one rank (what mla-launch spawns; run directly for a single rank or under srun/mpirun).
    Train(train::TrainArgs),
    /// List, verify and inspect checkpoints (an out_dir or step directory: path or s3:// URL).
    Ckpt(ckpt::CkptArgs),
    /// Benchmarks: `mla bench decode` measures prefill/decode speed and cache size per path.
    Bench(bench::BenchArgs),
    /// Train the variants of a study file under one budget, then report on them.
    Study(study::StudyArgs),
    /// Compare finished runs: report.md with a table and plots, report.csv, report.json.
    Report(report::ReportArgs),
}

/// Subcommands that take a run config, and so accept `--section.key value` overrides, with
/// their own flags that are spelled like a config key.
const CONFIG_COMMANDS: &[(&str, &[&str])] = &[
    ("info", &[]),
    ("train", &[]),
    ("bench", &["precision"]),
    ("study", &[]),
];

/// Parse `args` (without the program name) and run the subcommand.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    let config_command = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .and_then(|c| CONFIG_COMMANDS.iter().find(|(name, _)| name == c));
    let (rest, overrides): (Vec<String>, Vec<Override>) = match config_command {
        Some((_, own)) => split_overrides(&args, own).map_err(BadInput)?,
        None => (args, Vec::new()),
    };
    let cli = match Cli::try_parse_from(std::iter::once("mla".to_string()).chain(rest)) {
        Ok(cli) => cli,
        Err(e) => e.exit(), // clap prints usage and exits 2 (0 for --help/--version)
    };
    match cli.command {
        Command::Info(a) => info::run(&a, &overrides),
        Command::Train(a) => train::run(&a, &overrides),
        Command::Ckpt(a) => ckpt::run(&a),
        Command::Prepare(a) => prepare::run(&a),
        Command::Download(a) => download::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Export(a) => export::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::Bench(a) => bench::run(&a, &overrides),
        Command::Study(a) => study::run(&a, &overrides),
        Command::Report(a) => report::run(&a),
    }
}

/// Exit code for an error chain: 2 when any link is a user-input error.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let input = err.chain().any(|e| {
        e.is::<crate::error::BadInput>()
            || e.is::<crate::config::ConfigError>()
            || e.is::<mla_model::ModelError>()
            || e.downcast_ref::<crate::data::DataError>()
                .is_some_and(|d| d.is_bad_input())
    });
    if input {
        2
    } else {
        1
    }
}
