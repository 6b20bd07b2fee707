//! Where checkpoints live: parse `out_dir` (plain path, `file://`, `s3://bucket/prefix`,
//! `memory://`) and build the matching `object_store` backend.
//!
//! Not the protocol (see `store.rs`). S3 settings come only from the standard AWS environment
//! (`AmazonS3Builder::from_env`): there is deliberately no way to pass credentials in here, and
//! nothing derived from the builder (whose `Debug` shows secrets) is ever formatted.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use crate::error::{error_chain, Error, Result};
use crate::local::NoFollowFs;
use crate::manifest::StepName;
use crate::options::StoreOptions;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Backend {
    Local(PathBuf),
    S3 { bucket: String },
    Memory,
}

/// A parsed `out_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Location {
    pub backend: Backend,
    /// Root inside the backend (S3 key prefix / memory prefix; empty for local).
    pub root: Path,
    /// Canonical spelling for messages: `file:///abs/dir`, `s3://bucket/prefix`, `memory://`.
    pub url: String,
}

fn invalid(location: &str, reason: impl Into<String>) -> Error {
    Error::InvalidLocation {
        // Never echo credentials someone put into the URL.
        location: crate::error::redact_userinfo(location),
        reason: reason.into(),
    }
}

fn parse_prefix(location: &str, prefix: &str) -> Result<Path> {
    let prefix = prefix.trim_matches('/');
    Path::parse(prefix).map_err(|e| invalid(location, error_chain(&e)))
}

/// Split `scheme://rest`; `None` for a plain path.
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let plain = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    plain.then_some((scheme, rest))
}

pub(crate) fn parse(out_dir: &str) -> Result<Location> {
    let s = out_dir.trim();
    if s.is_empty() {
        return Err(invalid(out_dir, "empty"));
    }
    match split_scheme(s) {
        Some(("memory", rest)) => {
            let root = parse_prefix(out_dir, rest)?;
            let url = format!("memory://{root}");
            Ok(Location {
                backend: Backend::Memory,
                root,
                url,
            })
        }
        Some(("s3", rest)) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.contains('@') {
                return Err(invalid(
                    out_dir,
                    "credentials in the URL are not accepted: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment and write s3://bucket/prefix",
                ));
            }
            if bucket.is_empty() {
                return Err(invalid(
                    out_dir,
                    "no bucket name (expected s3://bucket/prefix)",
                ));
            }
            let root = parse_prefix(out_dir, prefix)?;
            let url = if root.as_ref().is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{root}")
            };
            Ok(Location {
                backend: Backend::S3 {
                    bucket: bucket.to_string(),
                },
                root,
                url,
            })
        }
        Some(("file", rest)) => local(out_dir, rest),
        Some((scheme, _)) => Err(invalid(
            out_dir,
            format!("unsupported scheme {scheme}:// (use a path, file://, s3:// or memory://)"),
        )),
        None => local(out_dir, s),
    }
}

fn local(out_dir: &str, path: &str) -> Result<Location> {
    if path.is_empty() {
        return Err(invalid(out_dir, "empty path"));
    }
    let abs = std::path::absolute(path).map_err(|e| invalid(out_dir, e.to_string()))?;
    let url = format!("file://{}", abs.display());
    Ok(Location {
        backend: Backend::Local(abs),
        root: Path::default(),
        url,
    })
}

/// An object-store location opened for something other than checkpoints (the trainer's token
/// datasets): the backend, the key prefix inside it, and the canonical URL for messages.
/// `Debug` prints the URL only (backends' `Debug` may show credentials).
#[derive(Clone)]
pub struct ObjectLocation {
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix of the location inside `store` (empty for a bucket root or a local directory).
    pub root: Path,
    /// `file:///abs/dir`, `s3://bucket/prefix` or `memory://prefix`.
    pub url: String,
}

impl std::fmt::Debug for ObjectLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectLocation")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Open `location` (a path, `file://path`, `s3://bucket/prefix` or `memory://prefix`) with the
/// same parsing, AWS environment and retry/timeout settings as [`crate::CheckpointStore`]; local
/// directories are created when missing, `memory://` is a new, empty store. No network I/O.
pub fn open_location(location: &str, opts: &StoreOptions) -> Result<ObjectLocation> {
    let loc = parse(location)?;
    let store = open_backend(&loc, opts)?;
    Ok(ObjectLocation {
        store,
        root: loc.root,
        url: loc.url,
    })
}

/// Check that `location` is a valid out_dir (a path, `file://`, `s3://bucket/prefix` or
/// `memory://`) without opening anything; returns its canonical URL. For config validation.
pub fn check_location(location: &str) -> Result<String> {
    parse(location).map(|l| l.url)
}

/// Split `…/step-00000400` (path or URL) into its `out_dir` and step name.
pub(crate) fn split_step_dir(step_dir: &str) -> Result<(String, StepName)> {
    let not_step = || Error::NotAStepDir {
        location: step_dir.to_string(),
    };
    let s = step_dir.trim().trim_end_matches('/');
    let (scheme, body) = match split_scheme(s) {
        Some((scheme, body)) => (Some(scheme), body),
        None => (None, s),
    };
    let (parent, last) = match body.rsplit_once('/') {
        Some((parent, last)) => (parent, last),
        None => ("", body),
    };
    let step = StepName::parse(last).ok_or_else(not_step)?;
    let out_dir = match scheme {
        // `s3://step-00000400` names a bucket, not a step.
        Some("s3") if parent.is_empty() => return Err(not_step()),
        Some(scheme) => format!("{scheme}://{parent}"),
        None if parent.is_empty() && !body.starts_with('/') => ".".to_string(),
        None if parent.is_empty() => "/".to_string(),
        None => parent.to_string(),
    };
    Ok((out_dir, step))
}

/// Build the backend. Local directories are created (with parents) when missing.
pub(crate) fn open_backend(loc: &Location, opts: &StoreOptions) -> Result<Arc<dyn ObjectStore>> {
    let open_err = |detail: String| Error::Open {
        url: loc.url.clone(),
        detail,
    };
    match &loc.backend {
        Backend::Memory => Ok(Arc::new(InMemory::new())),
        Backend::Local(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
            let fs = NoFollowFs::new(dir, opts.fsync).map_err(|e| open_err(error_chain(&e)))?;
            Ok(Arc::new(fs))
        }
        Backend::S3 { bucket } => {
            let retry = RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: opts.retry.init_backoff,
                    max_backoff: opts.retry.max_backoff,
                    base: 2.0,
                },
                max_retries: opts.retry.max_retries,
                retry_timeout: opts.retry.retry_timeout,
            };
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            // Set through config keys: `with_client_options` would drop AWS_ALLOW_HTTP & co.
            if let Some(t) = opts.request_timeout {
                b = b.with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                    format!("{}ms", t.as_millis()),
                );
            }
            if let Some(t) = opts.read_timeout {
                b = b.with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::ReadTimeout),
                    format!("{}ms", t.as_millis()),
                );
            }
            if let Some(t) = opts.connect_timeout {
                b = b.with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                    format!("{}ms", t.as_millis()),
                );
            }
            let s3 = b.build().map_err(|e| open_err(error_chain(&e)))?;
            Ok(Arc::new(s3))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_dir_spellings_parse_to_backends() {
        let l = parse("s3://bucket/a/b/").unwrap();
        assert_eq!(
            l.backend,
            Backend::S3 {
                bucket: "bucket".into()
            }
        );
        assert_eq!(l.root.as_ref(), "a/b");
        assert_eq!(l.url, "s3://bucket/a/b");
        assert_eq!(parse("s3://bucket").unwrap().url, "s3://bucket");
        assert_eq!(parse("memory://").unwrap().backend, Backend::Memory);
        let abs = parse("file:///tmp/x").unwrap();
        assert_eq!(abs.backend, Backend::Local("/tmp/x".into()));
        assert_eq!(abs.url, "file:///tmp/x");
        match parse("out/run").unwrap().backend {
            Backend::Local(p) => assert!(p.is_absolute() && p.ends_with("out/run")),
            other => panic!("{other:?}"),
        }
        assert!(parse("gs://b/p").is_err());
        assert!(parse("s3:///p").is_err());
        assert!(parse("s3://b/a//b").is_err());
        let creds = parse("s3://AKIAEXAMPLE:s3cr3t@bucket/x")
            .unwrap_err()
            .to_string();
        assert!(creds.contains("credentials in the URL"), "{creds}");
        assert!(
            !creds.contains("s3cr3t") && !creds.contains("AKIAEXAMPLE"),
            "{creds}"
        );
        assert!(parse("").is_err());
    }

    #[test]
    fn open_location_gives_backend_root_and_url() {
        let opts = StoreOptions::default();
        let mem = open_location("memory://data/tiny/", &opts).unwrap();
        assert_eq!(mem.root.as_ref(), "data/tiny");
        assert_eq!(mem.url, "memory://data/tiny");
        assert_eq!(
            format!("{mem:?}"),
            "ObjectLocation { url: \"memory://data/tiny\", .. }"
        );
        let s3 = open_location("s3://bucket/a/b", &opts).unwrap();
        assert_eq!(
            (s3.root.as_ref(), s3.url.as_str()),
            ("a/b", "s3://bucket/a/b")
        );
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("new");
        let local = open_location(sub.to_str().unwrap(), &opts).unwrap();
        assert!(sub.is_dir(), "local directories are created");
        assert_eq!(local.url, format!("file://{}", sub.display()));
        assert!(matches!(
            open_location("gs://b/p", &opts),
            Err(Error::InvalidLocation { .. })
        ));
    }

    #[test]
    fn step_dirs_split_into_out_dir_and_step() {
        let cases = [
            (
                "out/pretrain/mla/step-00000400",
                "out/pretrain/mla",
                StepName::Step(400),
            ),
            ("out/final/", "out", StepName::Final),
            ("step-00000001", ".", StepName::Step(1)),
            ("/step-00000001", "/", StepName::Step(1)),
            ("s3://b/p/step-00000400", "s3://b/p", StepName::Step(400)),
            ("s3://b/final", "s3://b", StepName::Final),
            ("file:///x/step-00000002", "file:///x", StepName::Step(2)),
            ("memory://step-00000003", "memory://", StepName::Step(3)),
        ];
        for (input, out_dir, step) in cases {
            assert_eq!(
                split_step_dir(input).unwrap(),
                (out_dir.to_string(), step),
                "{input}"
            );
        }
        for bad in ["out/pretrain", "s3://step-00000400", "s3://b/p", "step-4"] {
            assert!(split_step_dir(bad).is_err(), "{bad}");
        }
    }
}
