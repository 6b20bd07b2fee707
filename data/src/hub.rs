//! Datasets on the Hugging Face hub for `mla prepare --hf-dataset OWNER/NAME`: the Parquet
//! files of one subset and split, as the hub's dataset viewer lists them
//! (`GET {endpoint}/api/datasets/{repo}/parquet/{subset}/{split}`: a JSON list of file URLs,
//! the `refs/convert/parquet` export every public dataset has), downloaded once into a cache
//! directory (`<cache>/<owner>/<name>/<subset>/<split>/NNNNN.parquet`, each file atomically)
//! and then read like local Parquet inputs. `HF_ENDPOINT` names a mirror (the listed URLs are
//! moved onto it when they point at huggingface.co) and `HF_TOKEN` is sent for gated datasets.
//!
//! Not here: the HTTP itself (download.rs), reading Parquet (input.rs).

use std::path::{Path, PathBuf};

use super::download::{download_file, fetch_bytes, repo_dir, DownloadOptions, DEFAULT_HF_ENDPOINT};
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

/// The Parquet file URLs of `ds`, in the hub's order, moved onto `endpoint`.
pub fn list_parquet(ds: &HubDataset, opts: &DownloadOptions) -> Result<Vec<String>, DataError> {
    let url = ds.listing_url(&opts.endpoint);
    let bytes = fetch_bytes(&url)?;
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

/// Download the Parquet files of `ds` into its cache directory (files already there are
/// kept: a rerun downloads nothing); returns their paths in the hub's order.
pub fn fetch_parquet(
    ds: &HubDataset,
    cache_dir: &Path,
    opts: &DownloadOptions,
) -> Result<Vec<PathBuf>, DataError> {
    let dir = ds.dir(cache_dir)?;
    let urls = list_parquet(ds, opts)?;
    let mut paths = Vec::with_capacity(urls.len());
    for (i, url) in urls.iter().enumerate() {
        let dest = dir.join(format!("{i:05}.parquet"));
        if !dest.is_file() {
            tracing::info!(
                "{}: downloading {}/{} ({})",
                ds.repo,
                i + 1,
                urls.len(),
                mla_storage::redact_userinfo(url)
            );
            download_file(url, &dest, opts)?;
        }
        paths.push(dest);
    }
    Ok(paths)
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
}
