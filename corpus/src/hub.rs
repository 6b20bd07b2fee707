//! Datasets on the Hugging Face hub for `mla prepare --hf-dataset OWNER/NAME`: the Parquet
//! files of one subset and split, as the hub's dataset viewer lists them
//! (`GET {endpoint}/api/datasets/{repo}/parquet/{subset}/{split}`: a JSON list of file URLs,
//! the `refs/convert/parquet` export every public dataset has), downloaded once into a cache
//! directory (`<cache>/<owner>/<name>/<subset>/<split>/NNNNN.parquet`, each file atomically)
//! and then read like local Parquet inputs. `HF_ENDPOINT` names a mirror (the listed URLs are
//! moved onto it when they point at huggingface.co) and `HF_TOKEN` is sent for gated datasets,
//! to the endpoint's own origin only (a listing may name any host).
//!
//! Each cached file has a record beside it (`.NNNNN.parquet.source`: the sha256 of the URL it
//! came from, not the URL, which may hold a mirror's password, and its size): it is reused only
//! when the listing names the same URL at its place and it still has that size. So a listing
//! that changed (a re-exported dataset) downloads its files again instead of mixing them with
//! the old ones, and a cached file cut short is fetched again. A body that came without a
//! Content-Length (ended by the connection closing) is kept only if it is a whole Parquet file
//! (its `PAR1` magic and footer length at both ends).
//!
//! Not here: the HTTP itself (download.rs), reading Parquet (input.rs).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::download::{
    download, fetch_bytes_as, hf_token, repo_dir, DownloadOptions, DEFAULT_HF_ENDPOINT,
};
use super::error::DataError;

/// One subset and split of a hub dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubDataset {
    /// `owner/name`.
    pub repo: String,
    /// The dataset's config (`default` unless it has named ones, e.g. `sample-10BT`).
    pub subset: String,
    pub split: String,
}

impl HubDataset {
    /// URL of the listing of this subset's split on `endpoint`.
    pub fn listing_url(&self, endpoint: &str) -> String {
        format!(
            "{endpoint}/api/datasets/{}/parquet/{}/{}",
            self.repo, self.subset, self.split
        )
    }

    /// Where its files are cached under `cache_dir`.
    pub fn dir(&self, cache_dir: &Path) -> Result<PathBuf, DataError> {
        let safe = |what: &str, v: &str| {
            if v.is_empty() || v == "." || v == ".." || v.contains(['/', '\\']) {
                Err(DataError::InvalidOption {
                    key: what.into(),
                    message: format!("{v:?} is not a subset or split name"),
                })
            } else {
                Ok(())
            }
        };
        safe("--subset", &self.subset)?;
        safe("--split", &self.split)?;
        let repo = repo_dir(&self.repo, cache_dir).map_err(|_| DataError::InvalidOption {
            key: "--hf-dataset".into(),
            message: format!("{:?} is not of the form owner/name", self.repo),
        })?;
        Ok(repo.join(&self.subset).join(&self.split))
    }
}

/// The Parquet file URLs of `ds`, in the hub's order, moved onto `endpoint` (asked for with
/// `token`, which goes to the endpoint only).
fn list_parquet(
    ds: &HubDataset,
    opts: &DownloadOptions,
    token: Option<&str>,
) -> Result<Vec<String>, DataError> {
    let url = ds.listing_url(&opts.endpoint);
    let bytes = fetch_bytes_as(&url, &opts.endpoint, token)?;
    let urls: Vec<String> = serde_json::from_slice(&bytes).map_err(|e| DataError::Download {
        url: mla_storage::redact_userinfo(&url),
        status: Some(200),
        message: format!("not a list of Parquet file URLs ({e})"),
    })?;
    if urls.is_empty() {
        return Err(DataError::Download {
            url: mla_storage::redact_userinfo(&url),
            status: Some(200),
            message: format!(
                "dataset {} has no Parquet files for subset {:?}, split {:?}",
                ds.repo, ds.subset, ds.split
            ),
        });
    }
    Ok(urls
        .into_iter()
        .map(|u| on_endpoint(&u, &opts.endpoint))
        .collect())
}

/// `url` with the public hub's origin replaced by `endpoint` (a mirror serves the same paths).
fn on_endpoint(url: &str, endpoint: &str) -> String {
    match url.strip_prefix(DEFAULT_HF_ENDPOINT) {
        Some(path) if path.starts_with('/') => format!("{endpoint}{path}"),
        _ => url.to_owned(),
    }
}

/// Download the Parquet files of `ds` into its cache directory (a file already there from the
/// same URL, whole, is kept: a rerun downloads nothing); returns their paths in the hub's order.
pub fn fetch_parquet(
    ds: &HubDataset,
    cache_dir: &Path,
    opts: &DownloadOptions,
) -> Result<Vec<PathBuf>, DataError> {
    fetch_parquet_as(ds, cache_dir, opts, hf_token().as_deref())
}

/// [`fetch_parquet`] with `token` for the endpoint.
fn fetch_parquet_as(
    ds: &HubDataset,
    cache_dir: &Path,
    opts: &DownloadOptions,
    token: Option<&str>,
) -> Result<Vec<PathBuf>, DataError> {
    let dir = ds.dir(cache_dir)?;
    let urls = list_parquet(ds, opts, token)?;
    let mut paths = Vec::with_capacity(urls.len());
    for (i, url) in urls.iter().enumerate() {
        let dest = dir.join(format!("{i:05}.parquet"));
        let record = dir.join(format!(".{i:05}.parquet.source"));
        if !Source::of(url, 0).matches(&dest, &record) {
            tracing::info!(
                "{}: downloading {}/{} ({})",
                ds.repo,
                i + 1,
                urls.len(),
                mla_storage::redact_userinfo(url)
            );
            // The old record must not vouch for the new file if this download fails half-way.
            match std::fs::remove_file(&record) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DataError::io(&record, e))
                }
                _ => {}
            }
            let bytes = download(url, &dest, opts, token, Some(whole_parquet))?;
            Source::of(url, bytes).write(&record)?;
        }
        paths.push(dest);
    }
    Ok(paths)
}

/// The record beside a cached file: where it came from and how long it is.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    /// sha256 of the URL (hex): the URL itself may carry a mirror's user and password.
    url_sha256: String,
    /// The Content-Length it was downloaded with (or, without one, the size of the whole
    /// Parquet file that arrived).
    bytes: u64,
}

impl Source {
    fn of(url: &str, bytes: u64) -> Self {
        Self {
            url_sha256: hex::encode(Sha256::digest(url.as_bytes())),
            bytes,
        }
    }

    /// Whether `file` was downloaded from this source's URL (its `record` says so) and still
    /// has the size recorded.
    fn matches(&self, file: &Path, record: &Path) -> bool {
        let Ok(text) = std::fs::read(record) else {
            return false;
        };
        let Ok(recorded) = serde_json::from_slice::<Source>(&text) else {
            return false;
        };
        let size = std::fs::metadata(file)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        recorded.url_sha256 == self.url_sha256 && size == Some(recorded.bytes)
    }

    fn write(&self, record: &Path) -> Result<(), DataError> {
        let tmp = record.with_extension(format!("partial-{}", std::process::id()));
        let json = serde_json::to_vec(self).unwrap_or_default();
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, record))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                DataError::io(record, e)
            })
    }
}

/// A Parquet file is whole when it starts and ends with `PAR1` and its footer length (the u32
/// before the last magic) fits between them: a body cut short ends elsewhere.
fn whole_parquet(path: &Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot check it: {e}"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot check it: {e}"))?
        .len();
    let mut head = [0u8; 4];
    let mut tail = [0u8; 8];
    let read = f
        .read_exact(&mut head)
        .and_then(|()| f.seek(SeekFrom::End(-8)))
        .and_then(|_| f.read_exact(&mut tail));
    let footer = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if len < 12 || read.is_err() || &head != b"PAR1" || &tail[4..] != b"PAR1" || footer + 12 > len {
        return Err("it is not a whole Parquet file".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_urls_move_onto_a_mirror_and_names_stay_inside_the_cache() {
        let ds = HubDataset {
            repo: "roneneldan/TinyStories".into(),
            subset: "default".into(),
            split: "train".into(),
        };
        assert_eq!(
            ds.listing_url("http://mirror"),
            "http://mirror/api/datasets/roneneldan/TinyStories/parquet/default/train"
        );
        assert_eq!(
            on_endpoint(
                "https://huggingface.co/api/datasets/a/b/parquet/default/train/0.parquet",
                "http://mirror"
            ),
            "http://mirror/api/datasets/a/b/parquet/default/train/0.parquet"
        );
        assert_eq!(
            on_endpoint("http://other/x.parquet", "http://m"),
            "http://other/x.parquet"
        );
        let cache = Path::new("/c");
        assert_eq!(
            ds.dir(cache).unwrap(),
            Path::new("/c/roneneldan/TinyStories/default/train")
        );
        for (subset, split) in [("..", "train"), ("default", "a/b"), ("", "train")] {
            let bad = HubDataset {
                subset: subset.into(),
                split: split.into(),
                ..ds.clone()
            };
            assert!(bad.dir(cache).is_err(), "{subset:?} {split:?}");
        }
        let bad = HubDataset {
            repo: "../x".into(),
            ..ds
        };
        assert!(bad.dir(cache).is_err());
    }

    use crate::test_http::{Reply, Request, Server};

    /// Bytes that pass for a Parquet file here: the magic at both ends, a footer length that
    /// fits, `fill` between.
    fn parquet_like(fill: u8, len: usize) -> Vec<u8> {
        let mut b = b"PAR1".to_vec();
        b.resize(len - 8, fill);
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(b"PAR1");
        b
    }

    const API: &str = "/api/datasets/someone/tiny/parquet/default/train";

    fn tiny() -> HubDataset {
        HubDataset {
            repo: "someone/tiny".into(),
            subset: "default".into(),
            split: "train".into(),
        }
    }

    fn opts(hub: &Server) -> DownloadOptions {
        DownloadOptions {
            endpoint: hub.url.clone(),
            progress: false,
        }
    }

    fn listing(urls: &[String]) -> Reply {
        Reply::Sized(serde_json::to_vec(urls).unwrap())
    }

    #[test]
    fn hf_token_is_sent_to_the_endpoint_only_never_to_a_host_a_listing_names() {
        let (hub, other) = (Server::start(), Server::start());
        // The listing names a file on another host and one on huggingface.co (moved onto
        // the endpoint, a mirror here).
        hub.route(
            API,
            listing(&[
                format!("{}/x/0.parquet", other.url),
                format!("{DEFAULT_HF_ENDPOINT}{API}/1.parquet"),
            ]),
        );
        other.route("/x/0.parquet", Reply::Sized(parquet_like(b'a', 100)));
        hub.route(
            &format!("{API}/1.parquet"),
            Reply::Sized(parquet_like(b'b', 100)),
        );
        let cache = tempfile::tempdir().unwrap();
        let files = fetch_parquet_as(&tiny(), cache.path(), &opts(&hub), Some("secret")).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(
            other.requests(),
            [Request {
                path: "/x/0.parquet".into(),
                authorization: None
            }]
        );
        let sent: Vec<_> = hub
            .requests()
            .into_iter()
            .map(|r| r.authorization)
            .collect();
        assert_eq!(
            sent,
            [
                Some("Bearer secret".to_owned()),
                Some("Bearer secret".to_owned())
            ]
        );
    }

    #[test]
    fn a_cached_file_is_reused_only_for_the_same_url_and_its_recorded_size() {
        let hub = Server::start();
        let cache = tempfile::tempdir().unwrap();
        let fetch = || fetch_parquet_as(&tiny(), cache.path(), &opts(&hub), None).unwrap();
        let first = format!("{API}/0.parquet");
        hub.route(API, listing(&[format!("{}{first}", hub.url)]));
        hub.route(&first, Reply::Sized(parquet_like(b'a', 1000)));
        let files = fetch();
        assert_eq!(std::fs::read(&files[0]).unwrap(), parquet_like(b'a', 1000));
        fetch();
        assert_eq!(hub.hits(&first), 1, "a rerun downloads nothing");
        // Cut short on disk: its recorded size says so, and it is fetched again.
        std::fs::write(&files[0], &parquet_like(b'a', 1000)[..600]).unwrap();
        fetch();
        assert_eq!(hub.hits(&first), 2);
        assert_eq!(std::fs::read(&files[0]).unwrap(), parquet_like(b'a', 1000));
        // A re-exported dataset names another file at the same place: it replaces the old one
        // instead of the old one standing in for it.
        let second = format!("{API}/v2/0.parquet");
        hub.route(API, listing(&[format!("{}{second}", hub.url)]));
        hub.route(&second, Reply::Sized(parquet_like(b'b', 1000)));
        let files = fetch();
        assert_eq!(hub.hits(&second), 1);
        assert_eq!(std::fs::read(&files[0]).unwrap(), parquet_like(b'b', 1000));
    }

    #[test]
    fn a_body_without_content_length_is_kept_only_when_it_is_a_whole_parquet_file() {
        let hub = Server::start();
        let cache = tempfile::tempdir().unwrap();
        let file = format!("{API}/0.parquet");
        hub.route(API, listing(&[format!("{}{file}", hub.url)]));
        // The connection closed half-way: nothing says the body is short but the file itself.
        let whole = parquet_like(b'a', 1000);
        hub.route(&file, Reply::UntilClose(whole[..500].to_vec()));
        let e = fetch_parquet_as(&tiny(), cache.path(), &opts(&hub), None).unwrap_err();
        assert!(matches!(e, DataError::Download { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "download {}{file}: 500 bytes without a Content-Length, ended by the connection \
                 closing, and it is not a whole Parquet file (interrupted?)",
                hub.url
            )
        );
        let dir = tiny().dir(cache.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        hub.route(&file, Reply::UntilClose(whole.clone()));
        let files = fetch_parquet_as(&tiny(), cache.path(), &opts(&hub), None).unwrap();
        assert_eq!(std::fs::read(&files[0]).unwrap(), whole);
        fetch_parquet_as(&tiny(), cache.path(), &opts(&hub), None).unwrap();
        assert_eq!(hub.hits(&file), 2, "the whole file is reused");
    }
}
