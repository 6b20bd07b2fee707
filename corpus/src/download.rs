//! Downloads from the Hugging Face hub (or a mirror named by `HF_ENDPOINT`): the TinyStories
//! archive litgpt's `TinyStories` data module uses, and a repo's `tokenizer.json` /
//! `tokenizer_config.json`. Files land in a cache directory through a `.partial` file that is
//! renamed into place only when complete, so a file in the cache is always whole.
//!
//! Not here: which model files to fetch (interop/download.rs, which uses these), hub API listing,
//! resumable ranges. An `HF_TOKEN` in the environment is sent as a bearer token (gated repos),
//! only to the hub endpoint's own origin (scheme, host and port: a URL elsewhere, say one a
//! listing names, never sees it; redirects drop it, as ureq does by default), and never printed.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::DataError;

/// The hub used when `HF_ENDPOINT` is unset.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";
/// File name of the TinyStories archive (50 json files; litgpt keeps `data00.json` for validation).
pub const TINYSTORIES_ARCHIVE: &str = "TinyStories_all_data.tar.gz";

/// `HF_ENDPOINT` (without trailing `/`) or [`DEFAULT_HF_ENDPOINT`].
pub fn hf_endpoint() -> String {
    endpoint_from(std::env::var("HF_ENDPOINT").ok().as_deref())
}

fn endpoint_from(value: Option<&str>) -> String {
    value
        .map(|s| s.trim().trim_end_matches('/').to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_HF_ENDPOINT.to_owned())
}

/// URL of the TinyStories archive on `endpoint`.
pub fn tinystories_url(endpoint: &str) -> String {
    format!("{endpoint}/datasets/roneneldan/TinyStories/resolve/main/{TINYSTORIES_ARCHIVE}")
}

/// URL of `file` in model repo `repo` (e.g. `EleutherAI/pythia-160m`) on `endpoint`.
pub fn model_file_url(endpoint: &str, repo: &str, file: &str) -> String {
    format!("{endpoint}/{repo}/resolve/main/{file}")
}

/// Where and how to download.
#[derive(Clone, Debug)]
pub struct DownloadOptions {
    /// Hub base URL; default [`hf_endpoint`].
    pub endpoint: String,
    /// Progress bar on a terminal, a `tracing` line every 10 s otherwise.
    pub progress: bool,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            endpoint: hf_endpoint(),
            progress: true,
        }
    }
}

/// The raw TinyStories input inside a litgpt `TinyStories` `data_path`, if any: the extracted
/// `TinyStories_all_data/` directory, else the `TinyStories_all_data.tar.gz` archive. Only these
/// are looked at, so litgpt's own prepared `train/`/`val/` chunk directories beside them are
/// ignored. `None`: nothing there yet, so [`download_tinystories`] into `data_path` first.
pub fn tinystories_input(data_path: &Path) -> Option<PathBuf> {
    let extracted = data_path.join("TinyStories_all_data");
    if extracted.is_dir() {
        return Some(extracted);
    }
    let archive = data_path.join(TINYSTORIES_ARCHIVE);
    archive.is_file().then_some(archive)
}

/// Download the TinyStories archive into `cache_dir` unless it is there; returns its path.
pub fn download_tinystories(
    cache_dir: &Path,
    opts: &DownloadOptions,
) -> Result<PathBuf, DataError> {
    let dest = cache_dir.join(TINYSTORIES_ARCHIVE);
    if !dest.is_file() {
        download_file(&tinystories_url(&opts.endpoint), &dest, opts)?;
    }
    Ok(dest)
}

/// `cache_dir/<owner>/<name>` for hub repository `repo` (`owner/name`), litgpt's layout; a name
/// that could leave `cache_dir` is refused.
pub fn repo_dir(repo: &str, cache_dir: &Path) -> Result<PathBuf, DataError> {
    let valid =
        |part: &str| !part.is_empty() && part != "." && part != ".." && !part.contains('\\');
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() != 2 || !parts.iter().all(|p| valid(p)) {
        return Err(DataError::InvalidOption {
            key: "repo".into(),
            message: format!("{repo:?} is not of the form owner/name"),
        });
    }
    Ok(cache_dir.join(parts[0]).join(parts[1]))
}

/// Download `tokenizer.json` (required) and `tokenizer_config.json` (if the repo has one) of
/// `repo` into `cache_dir/<repo>/` unless present; returns that directory, ready for
/// [`Tokenizer::from_dir`](super::Tokenizer::from_dir).
pub fn download_tokenizer(
    repo: &str,
    cache_dir: &Path,
    opts: &DownloadOptions,
) -> Result<PathBuf, DataError> {
    let dir = repo_dir(repo, cache_dir)?;
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.is_file() {
        // The config first: once tokenizer.json exists the directory counts as complete.
        let config = dir.join("tokenizer_config.json");
        match download_file(
            &model_file_url(&opts.endpoint, repo, "tokenizer_config.json"),
            &config,
            opts,
        ) {
            Ok(_)
            | Err(DataError::Download {
                status: Some(404), ..
            }) => {}
            Err(e) => return Err(e),
        }
        download_file(
            &model_file_url(&opts.endpoint, repo, "tokenizer.json"),
            &tokenizer,
            opts,
        )?;
    }
    Ok(dir)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .user_agent(concat!("mla/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// A failed download; user-info in the URL (an `HF_ENDPOINT` with a password) is never shown.
fn download_error(url: &str, status: Option<u16>, message: String) -> DataError {
    DataError::Download {
        url: mla_storage::redact_userinfo(url),
        status,
        message: mla_storage::redact_userinfo(&message),
    }
}

/// `HF_TOKEN`, trimmed, unless unset or blank.
pub(crate) fn hf_token() -> Option<String> {
    std::env::var("HF_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// Whether `url` is on `endpoint`'s origin: the same scheme, host and port (the scheme's
/// default when none is written). A URL that does not parse is on no origin.
fn same_origin(url: &str, endpoint: &str) -> bool {
    fn origin(url: &str) -> Option<(String, String, u16)> {
        let uri: ureq::http::Uri = url.parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let host = uri.host()?.to_ascii_lowercase();
        let port = match (uri.port_u16(), scheme.as_str()) {
            (Some(p), _) => p,
            (None, "https") => 443,
            (None, "http") => 80,
            _ => return None,
        };
        Some((scheme, host, port))
    }
    origin(url).is_some_and(|o| Some(o) == origin(endpoint))
}

/// GET `url`, with `token` as a bearer token when it is on `endpoint`'s origin (never
/// elsewhere: a listing may name any host); an answer other than 200 is an error naming the
/// status.
fn get(
    url: &str,
    endpoint: &str,
    token: Option<&str>,
) -> Result<ureq::http::Response<ureq::Body>, DataError> {
    let mut req = agent().get(url);
    if let Some(token) = token.filter(|_| same_origin(url, endpoint)) {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    let resp = req.call().map_err(|e| {
        let hint = match e {
            ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Io(_)
            | ureq::Error::Timeout(_) => {
                " (offline? set HF_ENDPOINT to a reachable mirror, or give a local data path)"
            }
            _ => "",
        };
        download_error(url, None, format!("{e}{hint}"))
    })?;
    let status = resp.status().as_u16();
    if status != 200 {
        let what = match status {
            401 | 403 => " (gated or private: set HF_TOKEN)",
            404 => " (not found)",
            _ => "",
        };
        return Err(download_error(
            url,
            Some(status),
            format!("HTTP {status}{what}"),
        ));
    }
    Ok(resp)
}

/// The body of a small file at `url` (a config or an index: at most 64 MiB), in memory.
/// `HF_TOKEN` goes along only when `url` is on [`hf_endpoint`].
pub fn fetch_bytes(url: &str) -> Result<Vec<u8>, DataError> {
    fetch_bytes_as(url, &hf_endpoint(), hf_token().as_deref())
}

/// [`fetch_bytes`] with `token` for `endpoint`'s origin.
pub(crate) fn fetch_bytes_as(
    url: &str,
    endpoint: &str,
    token: Option<&str>,
) -> Result<Vec<u8>, DataError> {
    const LIMIT: u64 = 64 << 20;
    let mut bytes = Vec::new();
    get(url, endpoint, token)?
        .into_body()
        .into_reader()
        .take(LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| download_error(url, Some(200), format!("interrupted: {e}")))?;
    if bytes.len() as u64 > LIMIT {
        return Err(download_error(
            url,
            Some(200),
            format!("larger than {LIMIT} bytes, not a config or an index"),
        ));
    }
    Ok(bytes)
}

/// Download `url` to `dest` (atomically: `dest` appears only when complete). Returns the bytes.
/// `HF_TOKEN` goes along only when `url` is on `opts.endpoint`.
pub fn download_file(url: &str, dest: &Path, opts: &DownloadOptions) -> Result<u64, DataError> {
    download(url, dest, opts, hf_token().as_deref(), None)
}

/// Checks a downloaded file (`.partial`) that came without a Content-Length; a one-line reason
/// why it is not whole.
pub(crate) type WholeCheck = fn(&Path) -> Result<(), String>;

/// [`download_file`] with `token` for `opts.endpoint`'s origin; a body without a Content-Length
/// must pass `whole` (when given) before it is renamed into place. Returns the bytes, which
/// equal the Content-Length when there was one.
pub(crate) fn download(
    url: &str,
    dest: &Path,
    opts: &DownloadOptions,
    token: Option<&str>,
    whole: Option<WholeCheck>,
) -> Result<u64, DataError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let resp = get(url, &opts.endpoint, token)?;
    let status = 200;
    let expected = resp.body().content_length();
    let mut body = resp.into_body().into_reader();

    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = dir.join(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| -> Result<u64, DataError> {
        // A new file, never through an entry of that name left or planted there (a link).
        let _ = std::fs::remove_file(&partial);
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| DataError::io(&partial, e))?;
        let bar = progress_bar(opts.progress, expected, &name);
        let started = std::time::Instant::now();
        let mut last_line = started;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = body.read(&mut buf).map_err(|e| {
                download_error(
                    url,
                    Some(status),
                    format!("interrupted after {total} bytes: {e}"),
                )
            })?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .map_err(|e| DataError::io(&partial, e))?;
            total += n as u64;
            if let Some(b) = &bar {
                b.set_position(total);
            } else if opts.progress && last_line.elapsed() >= Duration::from_secs(10) {
                last_line = std::time::Instant::now();
                tracing::info!(
                    "download {name}: {total} of {} bytes, {:.1} MB/s",
                    expected.map_or("?".to_owned(), |e| e.to_string()),
                    total as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-9)
                );
            }
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        if let Some(e) = expected {
            if e != total {
                return Err(download_error(
                    url,
                    Some(status),
                    format!("interrupted: received {total} of {e} bytes"),
                ));
            }
        }
        file.sync_all().map_err(|e| DataError::io(&partial, e))?;
        drop(file);
        // Without a Content-Length the end of the body is where the connection closed, which
        // is also where an interrupted transfer ends: the file must vouch for itself.
        if let (None, Some(whole)) = (expected, whole) {
            whole(&partial).map_err(|why| {
                download_error(
                    url,
                    Some(status),
                    format!(
                        "{total} bytes without a Content-Length, ended by the connection \
                         closing, and {why} (interrupted?)"
                    ),
                )
            })?;
        }
        std::fs::rename(&partial, dest).map_err(|e| DataError::io(dest, e))?;
        Ok(total)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn progress_bar(enabled: bool, len: Option<u64>, name: &str) -> Option<indicatif::ProgressBar> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar =
        indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(format!("download {name}"));
    Some(bar)
}

/// The topmost ancestor of `dir` (itself included) that does not exist yet: what a download
/// into `dir` creates, and removes again when it fails. None when `dir` exists.
pub fn first_missing_ancestor(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .last()
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_hub_layout() {
        assert_eq!(
            tinystories_url("https://huggingface.co"),
            "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
        );
        assert_eq!(
            model_file_url("http://m", "EleutherAI/pythia-160m", "tokenizer.json"),
            "http://m/EleutherAI/pythia-160m/resolve/main/tokenizer.json"
        );
    }

    #[test]
    fn hf_endpoint_env_value_is_used_without_trailing_slash() {
        assert_eq!(endpoint_from(None), "https://huggingface.co");
        assert_eq!(endpoint_from(Some("")), "https://huggingface.co");
        assert_eq!(
            endpoint_from(Some("https://hf-mirror.com/")),
            "https://hf-mirror.com"
        );
    }

    #[test]
    fn tinystories_input_prefers_the_extracted_directory_over_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(tinystories_input(dir.path()), None);
        std::fs::write(dir.path().join(TINYSTORIES_ARCHIVE), b"x").unwrap();
        assert_eq!(
            tinystories_input(dir.path()),
            Some(dir.path().join(TINYSTORIES_ARCHIVE))
        );
        std::fs::create_dir(dir.path().join("TinyStories_all_data")).unwrap();
        assert_eq!(
            tinystories_input(dir.path()),
            Some(dir.path().join("TinyStories_all_data"))
        );
    }

    #[test]
    fn hf_token_goes_only_to_the_endpoints_own_origin() {
        let hub = "https://huggingface.co";
        assert!(same_origin("https://huggingface.co/api/x", hub));
        assert!(same_origin("https://HuggingFace.co:443/x", hub));
        assert!(same_origin(
            "http://u:p@mirror:8080/x",
            "http://mirror:8080"
        ));
        for elsewhere in [
            "https://evil.example/x.parquet",
            "http://huggingface.co/x",
            "https://huggingface.co:444/x",
            "https://huggingface.co.evil.example/x",
            "https://evil.example/?https://huggingface.co",
            "not a url",
        ] {
            assert!(!same_origin(elsewhere, hub), "{elsewhere}");
        }
    }

    #[test]
    fn repo_names_that_could_escape_the_cache_are_refused() {
        let opts = DownloadOptions {
            endpoint: "http://127.0.0.1:9".into(),
            progress: false,
        };
        for bad in ["../x", "a/../b", "a", "a/b/c", "/etc"] {
            let e = download_tokenizer(bad, Path::new("/nonexistent"), &opts).unwrap_err();
            assert!(matches!(e, DataError::InvalidOption { .. }), "{bad}: {e}");
        }
    }
}
