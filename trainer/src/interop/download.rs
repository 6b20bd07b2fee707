//! `mla download OWNER/NAME`: a Hugging Face model repository (config.json, weights, tokenizer
//! files) into `<checkpoint_dir>/<owner>/<name>`, litgpt's layout, ready for
//! `initial_checkpoint_dir`, `mla generate`, `mla eval` and `mla export` (import.rs reads it).
//! `HF_ENDPOINT` and `HF_TOKEN` are honoured (data::download does the HTTP).
//!
//! The config comes first: a model mla cannot build is refused before any weight is fetched.
//! The weights are the first of [`HF_WEIGHTS`] the repository has, with the shards an index
//! names. Every file lands whole (a `.partial` renamed into place) and one already there is
//! kept, so an interrupted download resumes file by file; `config.json` is written last, so a
//! directory with it is complete.
//!
//! Not here: the hub API (files are found by their conventional names), revisions other than
//! `main`, conversion (the directory stays in Hugging Face's layout: `mla export` converts).

use super::import::{hf_model, index_shards, HF_WEIGHTS};
use crate::data::{
    download_file, download_tokenizer, fetch_bytes, model_file_url, repo_dir, DataError,
    DownloadOptions,
};
use crate::error::BadInput;
use anyhow::Context;
use mla_model::ModelConfig;
use std::path::{Path, PathBuf};

/// What a download brought.
pub struct Downloaded {
    pub dir: PathBuf,
    /// The Hugging Face form ("GPTNeoX", "Llama", "DeepSeek-V2").
    pub form: &'static str,
    pub model: ModelConfig,
    /// Files fetched now, and their bytes; files found in place from an earlier download.
    pub fetched: usize,
    pub bytes: u64,
    pub kept: usize,
}

/// Fetch model repository `repo` into `root/<owner>/<name>`.
pub fn model(repo: &str, root: &Path, opts: &DownloadOptions) -> anyhow::Result<Downloaded> {
    let dir = repo_dir(repo, root).map_err(|e| BadInput(format!("mla download: {e}")))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let url = |file: &str| model_file_url(&opts.endpoint, repo, file);

    let config = fetch_bytes(&url("config.json"))?;
    let text = String::from_utf8_lossy(&config);
    let (form, model) = hf_model(&text, &name)
        .map(|(c, m)| (c.form(), m))
        .map_err(|e| BadInput(format!("{repo}: config.json: {e}; nothing was downloaded")))?;

    let mut got = Tally::default();
    let tokenizer_files = ["tokenizer.json", "tokenizer_config.json"].map(|f| dir.join(f));
    let before = tokenizer_files.clone().map(|f| f.is_file());
    match download_tokenizer(repo, root, opts) {
        Ok(_) => {
            for (file, was) in tokenizer_files.iter().zip(before) {
                match (was, std::fs::metadata(file)) {
                    (true, _) => got.kept += 1,
                    (false, Ok(m)) => {
                        got.fetched += 1;
                        got.bytes += m.len();
                    }
                    (false, Err(_)) => {} // the repository has no tokenizer_config.json
                }
            }
        }
        Err(DataError::Download {
            status: Some(404), ..
        }) => tracing::warn!(
            "{repo} has no tokenizer.json (mla reads Hugging Face tokenizers' tokenizer.json): \
             give a tokenizer_dir when you use this model"
        ),
        Err(e) => return Err(e.into()),
    }
    got.fetch_optional(&url("generation_config.json"), &dir, opts)?;

    let weights = fetch_weights(repo, &dir, opts, &mut got)?;
    write_whole(&dir.join("config.json"), &config)?;
    tracing::info!("{repo}: weights from {weights}");
    Ok(Downloaded {
        dir,
        form,
        model,
        fetched: got.fetched,
        bytes: got.bytes,
        kept: got.kept,
    })
}

/// Files fetched and kept.
#[derive(Default)]
struct Tally {
    fetched: usize,
    bytes: u64,
    kept: usize,
}

impl Tally {
    /// `url` into `dest` unless `dest` is there. `Ok(false)`: the repository has no such file
    /// (404).
    fn fetch(&mut self, url: &str, dest: &Path, opts: &DownloadOptions) -> Result<bool, DataError> {
        if dest.is_file() {
            self.kept += 1;
            return Ok(true);
        }
        match download_file(url, dest, opts) {
            Ok(n) => {
                self.fetched += 1;
                self.bytes += n;
                Ok(true)
            }
            Err(DataError::Download {
                status: Some(404), ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `url`'s file into `dir` if the repository has it.
    fn fetch_optional(
        &mut self,
        url: &str,
        dir: &Path,
        opts: &DownloadOptions,
    ) -> Result<(), DataError> {
        let file = url.rsplit('/').next().unwrap_or_default();
        self.fetch(url, &dir.join(file), opts).map(|_| ())
    }
}

/// The first of [`HF_WEIGHTS`] the repository has, with its shards; returns its name.
fn fetch_weights(
    repo: &str,
    dir: &Path,
    opts: &DownloadOptions,
    got: &mut Tally,
) -> anyhow::Result<&'static str> {
    for file in HF_WEIGHTS {
        let url = model_file_url(&opts.endpoint, repo, file);
        if !file.ends_with(".index.json") {
            if got.fetch(&url, &dir.join(file), opts)? {
                return Ok(file);
            }
            continue;
        }
        let index = match fetch_bytes(&url) {
            Ok(bytes) => bytes,
            Err(DataError::Download {
                status: Some(404), ..
            }) => continue,
            Err(e) => return Err(e.into()),
        };
        let shards = index_shards(&index).map_err(|e| BadInput(format!("{repo}: {file}: {e}")))?;
        for shard in &shards {
            let url = model_file_url(&opts.endpoint, repo, shard);
            if !got.fetch(&url, &dir.join(shard), opts)? {
                anyhow::bail!("{repo}: {file} names {shard}, which the repository does not have");
            }
        }
        write_whole(&dir.join(file), &index)?;
        return Ok(file);
    }
    Err(BadInput(format!(
        "{repo} has none of {}: no weights to download",
        HF_WEIGHTS.join(", ")
    ))
    .into())
}

/// `bytes` to `path` through a temporary file renamed into place.
fn write_whole(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.partial", std::process::id()));
    // A new file, never through an entry of that name left or planted there (a link).
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
