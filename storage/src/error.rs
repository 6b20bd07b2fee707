//! Errors of the checkpoint store: one `thiserror` enum whose variants carry the store URL, the
//! step and the object they are about.
//!
//! Not a place for policy (retry, fall back, stop): callers match on variants. Messages from the
//! underlying object store are turned into strings *after* scrubbing credentials
//! ([`redact_secrets`]), so no variant can ever print an AWS secret, even through `source()`.

use crate::manifest::StepName;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure the object store reported (kept so callers need not parse messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    NotFound,
    PermissionDenied,
    Unauthenticated,
    /// Anything else: network, server error after all retries, local I/O.
    Other,
}

/// Why an object of a step failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Corruption {
    /// Listed in the manifest but absent from the store.
    Missing,
    SizeMismatch {
        expected_bytes: u64,
        actual_bytes: u64,
    },
    Sha256Mismatch {
        expected: String,
        actual: String,
    },
    /// On local disk: a symbolic link or something else that is not a regular file.
    NotRegular {
        what: String,
    },
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corruption::Missing => write!(f, "missing"),
            Corruption::SizeMismatch {
                expected_bytes,
                actual_bytes,
            } => write!(
                f,
                "size {actual_bytes} bytes, manifest says {expected_bytes} bytes"
            ),
            Corruption::Sha256Mismatch { expected, actual } => {
                write!(f, "sha256 {actual}, manifest says {expected}")
            }
            Corruption::NotRegular { what } => write!(f, "{what}: refused"),
        }
    }
}

/// Every error of `mla-storage`. `url` is the store root (`s3://bucket/prefix`, `file:///abs/dir`,
/// `memory://`), never anything with credentials in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid checkpoint location {location:?}: {reason}")]
    InvalidLocation { location: String, reason: String },

    #[error("cannot open checkpoint store {url}: {detail}")]
    Open { url: String, detail: String },

    #[error("{op} {url}/{path} failed: {detail}")]
    Store {
        op: &'static str,
        url: String,
        /// Path relative to the store root (`step-00000400/model.safetensors`).
        path: String,
        kind: StoreErrorKind,
        detail: String,
    },

    #[error("{url}/{step}: no manifest.json (incomplete save or deleted checkpoint)")]
    MissingManifest { url: String, step: StepName },

    #[error("{url}/{step}/manifest.json is invalid: {reason}")]
    InvalidManifest {
        url: String,
        step: StepName,
        reason: String,
    },

    #[error("{url}/{step}: object {object} is corrupt: {problem}")]
    Corrupt {
        url: String,
        step: StepName,
        object: String,
        problem: Corruption,
    },

    #[error("invalid object name {name:?}: {reason}")]
    InvalidObjectName { name: String, reason: String },

    #[error("{url}/{step}: object {object} is not listed in the manifest")]
    UnknownObject {
        url: String,
        step: StepName,
        object: String,
    },

    #[error("{location:?} is not a step directory (expected …/step-NNNNNNNN or …/final)")]
    NotAStepDir { location: String },

    /// An `MLA_STORE_*` environment variable that does not parse (see `StoreOptions::from_env`).
    #[error("environment variable {name}={value:?}: {reason}")]
    InvalidEnv {
        name: String,
        value: String,
        reason: String,
    },

    /// Another run holds the out_dir (its lock file or lease object; see `lease.rs`).
    #[error("{url} is in use by {holder}: {detail}")]
    Locked {
        url: String,
        holder: String,
        detail: String,
    },

    /// This run's lease on the out_dir was taken over by another run: stop writing.
    #[error("{url}: this run no longer owns the out_dir: {holder} took it over")]
    LeaseLost { url: String, holder: String },

    #[error("background saver: {detail}")]
    Saver { detail: String },

    /// A background task panicked or was cancelled; a bug, not a storage condition.
    #[error("internal error: {detail}")]
    Internal { detail: String },
}

impl Error {
    /// The step this error is about, if any.
    pub fn step(&self) -> Option<&StepName> {
        match self {
            Error::MissingManifest { step, .. }
            | Error::InvalidManifest { step, .. }
            | Error::Corrupt { step, .. }
            | Error::UnknownObject { step, .. } => Some(step),
            _ => None,
        }
    }

    /// The object (file inside a step) this error is about, if any.
    pub fn object(&self) -> Option<&str> {
        match self {
            Error::Corrupt { object, .. } | Error::UnknownObject { object, .. } => Some(object),
            _ => None,
        }
    }

    /// True for an object-store "not found".
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Store {
                kind: StoreErrorKind::NotFound,
                ..
            }
        )
    }

    pub(crate) fn store(
        op: &'static str,
        url: &str,
        path: impl Into<String>,
        err: &object_store::Error,
    ) -> Self {
        let kind = match err {
            object_store::Error::NotFound { .. } => StoreErrorKind::NotFound,
            object_store::Error::PermissionDenied { .. } => StoreErrorKind::PermissionDenied,
            object_store::Error::Unauthenticated { .. } => StoreErrorKind::Unauthenticated,
            _ => StoreErrorKind::Other,
        };
        Error::Store {
            op,
            url: url.to_string(),
            path: path.into(),
            kind,
            detail: error_chain(err),
        }
    }
}

/// `err` and its sources on one line, credentials scrubbed (for other users of object_store,
/// such as token datasets, whose errors must read the same).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let msg = s.to_string();
        // object_store often repeats the source inside its own message.
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    // One line: S3 error bodies are multi-line XML.
    let out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    redact_secrets(&compact_s3_error_body(&out))
}

/// An S3 XML error body (`<?xml …?> <Error><Code>NoSuchBucket</Code><Message>The specified
/// bucket does not exist</Message><RequestId>…</Error>`) as `NoSuchBucket: The specified bucket
/// does not exist`; request ids and host ids say nothing to a user.
fn compact_s3_error_body(msg: &str) -> String {
    let tag = |body: &str, name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].to_string())
    };
    let (Some(start), Some(end)) = (msg.find("<?xml"), msg.find("</Error>")) else {
        return msg.to_string();
    };
    if end < start {
        return msg.to_string();
    }
    let body = &msg[start..end];
    let summary = match (tag(body, "Code"), tag(body, "Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => return msg.to_string(),
    };
    format!(
        "{}{summary}{}",
        &msg[..start],
        &msg[end + "</Error>".len()..]
    )
}

/// Replace the values of the AWS credential variables found in the environment by `***`, and
/// the user-info of every URL (`http://user:password@host` → `http://***@host`).
///
/// Belt and braces: object_store does not put secrets into its messages, but S3 servers echo
/// request details (e.g. `AWSAccessKeyId` in `SignatureDoesNotMatch`) in error bodies, and
/// request URLs carry an `AWS_ENDPOINT_URL`'s user-info.
pub fn redact_secrets(msg: &str) -> String {
    let mut out = redact_userinfo(msg);
    for (var, min_len) in [
        ("AWS_SECRET_ACCESS_KEY", 1),
        ("AWS_SESSION_TOKEN", 1),
        // Key ids are identifiers rather than secrets; short dummy ids like "test" would mangle
        // unrelated words, so only scrub realistic ones.
        ("AWS_ACCESS_KEY_ID", 8),
    ] {
        if let Ok(value) = std::env::var(var) {
            if value.len() >= min_len && out.contains(&value) {
                out = out.replace(&value, "***");
            }
        }
    }
    out
}

/// `scheme://user:password@host/…` → `scheme://***@host/…`, for every URL in `msg`.
pub fn redact_userinfo(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or whitespace; user-info ends at its
        // last '@'.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_error_bodies_shrink_to_code_and_message() {
        let raw = "404 Not Found: <?xml version=\"1.0\" encoding=\"utf-8\"?> <Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message><BucketName>b</BucketName><RequestId>abc</RequestId></Error> (tail)";
        assert_eq!(
            compact_s3_error_body(raw),
            "404 Not Found: NoSuchBucket: The specified bucket does not exist (tail)"
        );
        assert_eq!(compact_s3_error_body("plain"), "plain");
    }

    #[test]
    fn user_info_of_every_url_is_redacted() {
        assert_eq!(
            redact_userinfo(
                "PUT http://ak:s3cr3t@127.0.0.1:9000/b/k failed; see s3://u:p@bucket/x"
            ),
            "PUT http://***@127.0.0.1:9000/b/k failed; see s3://***@bucket/x"
        );
        assert_eq!(redact_userinfo("http://host/a@b"), "http://host/a@b");
        assert_eq!(redact_userinfo("no url here"), "no url here");
        assert_eq!(redact_userinfo("http://:pw@h"), "http://***@h");
    }
}
