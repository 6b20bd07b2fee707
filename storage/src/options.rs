//! How a store behaves: part sizes and concurrency of uploads, fsync, S3 timeouts and retries
//! ([`StoreOptions`], [`RetryOptions`]), with the `MLA_STORE_*` environment variables that tune
//! them. Read by location.rs (opening a backend) and store.rs (uploads, verification).
//!
//! Not here: the backends themselves (location.rs), the protocol (store.rs).

use std::time::Duration;

use crate::error::{Error, Result};

/// Retries of transient errors (S3): exponential backoff from `init_backoff` doubling up to
/// `max_backoff`, at most `max_retries` times and never past `retry_timeout` from the first try.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryOptions {
    pub max_retries: usize,
    pub init_backoff: Duration,
    pub max_backoff: Duration,
    pub retry_timeout: Duration,
}

impl Default for RetryOptions {
    /// object_store's defaults: 10 retries, 100 ms → 15 s backoff, 3 min in all.
    fn default() -> Self {
        RetryOptions {
            max_retries: 10,
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            retry_timeout: Duration::from_secs(180),
        }
    }
}

/// Tuning of a store. The defaults suit checkpoints of 10 MB … 10 GB.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// Objects larger than this go up as multipart uploads, smaller ones with one PUT.
    pub multipart_threshold_bytes: usize,
    /// Part size of multipart uploads. S3 needs ≥ 5 MiB (except the last part) and ≤ 10,000
    /// parts, so 8 MiB allows objects up to ~80 GB.
    pub part_size_bytes: usize,
    /// Parts of one object in flight at once.
    pub max_concurrency: usize,
    /// Objects read and hashed at once when verifying a step.
    pub verify_concurrency: usize,
    /// Local disk: fsync files and directories before a write returns (durable manifests).
    pub fsync: bool,
    /// S3: per-request timeout (object_store default 30 s when `None`).
    pub request_timeout: Option<Duration>,
    /// S3: connect timeout (object_store default 5 s when `None`).
    pub connect_timeout: Option<Duration>,
    /// S3: longest wait for the next bytes of a response, the first ones included (none when
    /// `None`): an endpoint that accepts connections but never answers is an error this soon.
    pub read_timeout: Option<Duration>,
    pub retry: RetryOptions,
    /// Test hook: sleep this long before every PUT and every multipart upload (`delay.rs`),
    /// so that saves are slow enough to interrupt at a chosen moment.
    pub put_delay: Option<Duration>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            multipart_threshold_bytes: 16 << 20,
            part_size_bytes: 8 << 20,
            max_concurrency: 8,
            verify_concurrency: 4,
            fsync: true,
            request_timeout: None,
            connect_timeout: None,
            read_timeout: None,
            retry: RetryOptions::default(),
            put_delay: None,
        }
    }
}

/// Environment variables read by [`StoreOptions::from_env`] (what `CheckpointStore::open` uses).
pub const ENV_REQUEST_TIMEOUT_SECS: &str = "MLA_STORE_REQUEST_TIMEOUT_SECS";
pub const ENV_CONNECT_TIMEOUT_SECS: &str = "MLA_STORE_CONNECT_TIMEOUT_SECS";
pub const ENV_READ_TIMEOUT_SECS: &str = "MLA_STORE_READ_TIMEOUT_SECS";
pub const ENV_MAX_RETRIES: &str = "MLA_STORE_MAX_RETRIES";
pub const ENV_RETRY_TIMEOUT_SECS: &str = "MLA_STORE_RETRY_TIMEOUT_SECS";
/// Test hook: milliseconds of sleep before every PUT / multipart part.
pub const ENV_TEST_PUT_DELAY_MS: &str = "MLA_STORE_TEST_PUT_DELAY_MS";

impl StoreOptions {
    /// The defaults with the `MLA_STORE_*` environment variables applied: request/connect
    /// timeouts, retries and retry budget (S3), and the `MLA_STORE_TEST_PUT_DELAY_MS` test hook.
    /// Unset or empty variables keep the default; a value that does not parse is an error.
    pub fn from_env() -> Result<StoreOptions> {
        Self::from_vars(StoreOptions::default(), |name| std::env::var(name).ok())
    }

    /// For commands a person waits on (`mla ckpt`, the start-up probe of a run): an endpoint
    /// that does not answer is an error within seconds, not after the training saves' patient
    /// retry budget. Connect timeout 3 s, first-byte (read) timeout 5 s, 2 retries within 15 s.
    pub fn interactive() -> StoreOptions {
        StoreOptions {
            connect_timeout: Some(Duration::from_secs(3)),
            read_timeout: Some(Duration::from_secs(5)),
            retry: RetryOptions {
                max_retries: 2,
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                retry_timeout: Duration::from_secs(15),
            },
            ..StoreOptions::default()
        }
    }

    /// [`StoreOptions::interactive`] with the `MLA_STORE_*` variables applied.
    pub fn interactive_from_env() -> Result<StoreOptions> {
        Self::from_vars(StoreOptions::interactive(), |name| std::env::var(name).ok())
    }

    /// The network limits in force, for messages: "connect timeout 3 s, first-byte timeout
    /// 5 s, at most 2 retries within 15 s".
    pub fn limits(&self) -> String {
        let secs = |d: Option<Duration>, default: &str| {
            d.map_or_else(|| default.to_string(), |d| format!("{} s", d.as_secs_f64()))
        };
        format!(
            "connect timeout {}, first-byte timeout {}, at most {} retries within {} s (MLA_STORE_* variables change these)",
            secs(self.connect_timeout, "5 s"),
            secs(self.read_timeout, "none"),
            self.retry.max_retries,
            self.retry.retry_timeout.as_secs_f64()
        )
    }

    fn from_vars(base: StoreOptions, var: impl Fn(&str) -> Option<String>) -> Result<StoreOptions> {
        let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let invalid = |name: &str, value: &str, reason: &str| Error::InvalidEnv {
            name: name.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let secs = |name: &str| -> Result<Option<Duration>> {
            get(name)
                .map(|v| match v.trim().parse::<f64>() {
                    Ok(s) if s.is_finite() && s >= 0.0 => Ok(Duration::from_secs_f64(s)),
                    _ => Err(invalid(name, &v, "expected a number of seconds ≥ 0")),
                })
                .transpose()
        };
        let mut o = base;
        if let Some(t) = secs(ENV_REQUEST_TIMEOUT_SECS)? {
            o.request_timeout = Some(t);
        }
        if let Some(t) = secs(ENV_CONNECT_TIMEOUT_SECS)? {
            o.connect_timeout = Some(t);
        }
        if let Some(t) = secs(ENV_READ_TIMEOUT_SECS)? {
            o.read_timeout = Some(t);
        }
        if let Some(t) = secs(ENV_RETRY_TIMEOUT_SECS)? {
            o.retry.retry_timeout = t;
        }
        if let Some(v) = get(ENV_MAX_RETRIES) {
            o.retry.max_retries = v
                .trim()
                .parse()
                .map_err(|_| invalid(ENV_MAX_RETRIES, &v, "expected a whole number ≥ 0"))?;
        }
        if let Some(v) = get(ENV_TEST_PUT_DELAY_MS) {
            let ms: u64 = v
                .trim()
                .parse()
                .map_err(|_| invalid(ENV_TEST_PUT_DELAY_MS, &v, "expected whole milliseconds"))?;
            o.put_delay = (ms > 0).then(|| Duration::from_millis(ms));
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn opts_from(vars: &[(&str, &str)]) -> Result<StoreOptions> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StoreOptions::from_vars(StoreOptions::default(), |name| vars.get(name).cloned())
    }

    #[test]
    fn options_from_env_apply_timeouts_retries_and_put_delay() {
        assert_eq!(opts_from(&[]).unwrap(), StoreOptions::default());
        let o = opts_from(&[
            (ENV_REQUEST_TIMEOUT_SECS, "1.5"),
            (ENV_CONNECT_TIMEOUT_SECS, "2"),
            (ENV_MAX_RETRIES, "1"),
            (ENV_RETRY_TIMEOUT_SECS, "3"),
            (ENV_TEST_PUT_DELAY_MS, "250"),
        ])
        .unwrap();
        assert_eq!(o.request_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(o.connect_timeout, Some(Duration::from_secs(2)));
        assert_eq!(o.retry.max_retries, 1);
        assert_eq!(o.retry.retry_timeout, Duration::from_secs(3));
        assert_eq!(o.put_delay, Some(Duration::from_millis(250)));
        assert_eq!(
            opts_from(&[(ENV_TEST_PUT_DELAY_MS, "0"), (ENV_MAX_RETRIES, " ")])
                .unwrap()
                .put_delay,
            None
        );
    }

    #[test]
    fn unparsable_option_env_names_the_variable() {
        for (name, value) in [
            (ENV_REQUEST_TIMEOUT_SECS, "soon"),
            (ENV_RETRY_TIMEOUT_SECS, "-1"),
            (ENV_MAX_RETRIES, "1.5"),
            (ENV_TEST_PUT_DELAY_MS, "1s"),
        ] {
            let e = opts_from(&[(name, value)]).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(value), "{e}");
        }
    }
}
