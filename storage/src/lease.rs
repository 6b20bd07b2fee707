//! Who owns an `out_dir`: one run at a time, so two runs can never replace each other's
//! checkpoints (issue 14). A run takes the out_dir's lease before it writes anything and holds
//! it until it ends; a second run is refused with the holder named.
//!
//! * **Local directories**: an exclusive `flock` on `<out_dir>/.mla-lock` (std's
//!   `File::try_lock`), which the kernel drops when the process dies, however it dies. The file
//!   holds the holder's description for the refusal message and is never deleted (deleting a
//!   lock file races with the next run's open).
//! * **Object stores** (S3, memory): a lease object `<out_dir>/.mla-lease.json` created with a
//!   conditional PUT (`PutMode::Create`, S3 `If-None-Match: *`) and renewed every `ttl / 4` with
//!   `PutMode::Update` (`If-Match` on its ETag). A lease whose object has not changed for
//!   `2 × ttl` (by the store's clock, read against ours: hosts keep NTP time) is stale, from a
//!   run that died, and is taken over the same conditional way; one of the same `run_id` (the
//!   launcher restarting its ranks) is taken over at once. A renewal that finds another ETag
//!   means the lease was taken: [`Lease::check`] then fails, and the caller must not write.
//!
//! Not here: when to take it (the trainer, before any work) or what to tell the user beyond
//! the holder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The lock file of a local out_dir.
pub const LOCK_FILE: &str = ".mla-lock";
/// The lease object of an object-store out_dir.
pub const LEASE_OBJECT: &str = ".mla-lease.json";
/// Lease time to live unless `MLA_LEASE_TTL_SECS` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Environment variable: lease time to live in seconds (tests shorten it).
pub const ENV_LEASE_TTL_SECS: &str = "MLA_LEASE_TTL_SECS";

/// Who holds (or wants) an out_dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Same for every process of one run, across the launcher's restarts.
    pub run_id: String,
    pub host: String,
    pub pid: u32,
    /// RFC 3339, when the holder took the lease.
    pub since: String,
}

impl Holder {
    /// This process, as part of run `run_id` (None: a run of its own).
    pub fn this_process(run_id: Option<&str>) -> Holder {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown-host".into());
        let pid = std::process::id();
        let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let run_id = run_id
            .map(str::to_string)
            .unwrap_or_else(|| format!("{host}-{pid}-{since}"));
        Holder {
            run_id,
            host,
            pid,
            since,
        }
    }

    /// `run R (pid P on host H, since T)`.
    pub fn describe(&self) -> String {
        format!(
            "run {} (pid {} on host {}, since {})",
            self.run_id, self.pid, self.host, self.since
        )
    }
}

/// The time to live of leases: `MLA_LEASE_TTL_SECS` or [`DEFAULT_TTL`].
pub fn ttl_from_env() -> Result<Duration> {
    match std::env::var(ENV_LEASE_TTL_SECS) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| Error::InvalidEnv {
                name: ENV_LEASE_TTL_SECS.into(),
                value: v,
                reason: "expected a positive number of seconds".into(),
            }),
        _ => Ok(DEFAULT_TTL),
    }
}

/// A held lease. Dropping it releases it (the lock file's lock, or the lease object when it
/// is still ours).
pub struct Lease {
    url: String,
    kind: Kind,
}

enum Kind {
    Local {
        _file: std::fs::File,
    },
    Object {
        shared: Arc<Shared>,
        heartbeat: tokio::task::JoinHandle<()>,
        rt: Arc<tokio::runtime::Runtime>,
    },
}

/// State shared between a lease and its heartbeat task.
struct Shared {
    store: Arc<dyn ObjectStore>,
    path: Path,
    url: String,
    holder: Holder,
    version: Mutex<UpdateVersion>,
    /// Set when a renewal found the lease taken by another run.
    lost: AtomicBool,
    lost_to: Mutex<Option<String>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Whether this run still holds the out_dir; an error naming the run that took it
    /// otherwise (the caller must then stop writing).
    pub fn check(&self) -> Result<()> {
        match &self.kind {
            Kind::Local { .. } => Ok(()),
            Kind::Object { shared, .. } => {
                if shared.lost.load(Ordering::SeqCst) {
                    let by = shared
                        .lost_to
                        .lock()
                        .ok()
                        .and_then(|g| g.clone())
                        .unwrap_or_else(|| "another run".into());
                    Err(Error::LeaseLost {
                        url: self.url.clone(),
                        holder: by,
                    })
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The out_dir this lease is for.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Kind::Object {
            shared,
            heartbeat,
            rt,
        } = &self.kind
        {
            heartbeat.abort();
            if shared.lost.load(Ordering::SeqCst) {
                return;
            }
            // Delete the lease object if it is still ours (its ETag unchanged). Best effort:
            // a leftover lease only delays the next run until it goes stale.
            let shared = Arc::clone(shared);
            let release = async move {
                let current = shared.store.head(&shared.path).await;
                let ours = shared.version.lock().ok().map(|v| v.e_tag.clone());
                if let (Ok(meta), Some(ours)) = (current, ours) {
                    if meta.e_tag == ours {
                        let _ = shared.store.delete(&shared.path).await;
                    }
                }
            };
            if tokio::runtime::Handle::try_current().is_err() {
                rt.block_on(release);
            } else {
                drop(rt.spawn(release));
            }
        }
    }
}

/// Take the lock file of a local out_dir.
pub(crate) fn lock_local(dir: &std::path::Path, url: &str, holder: &Holder) -> Result<Lease> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let io_err = |e: std::io::Error| Error::Open {
        url: url.to_string(),
        detail: format!("lock file {}: {e}", path.display()),
    };
    // Never through a link: `.mla-lock -> ~/somefile` would be truncated and overwritten.
    // `open_file`'s errors name the file already.
    let mut file = crate::local::open_file(dir, LOCK_FILE, crate::local::OpenMode::ReadWrite)
        .map_err(|e| Error::Open {
            url: url.to_string(),
            detail: e.to_string(),
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = serde_json::from_str::<Holder>(&text)
                .map(|h| h.describe())
                .unwrap_or_else(|_| "another run (its lock file names no holder)".into());
            return Err(Error::Locked {
                url: url.to_string(),
                holder,
                detail: format!("it holds the lock on {}", path.display()),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
    }
    let json = serde_json::to_vec_pretty(holder).map_err(|e| Error::Internal {
        detail: format!("lease holder JSON: {e}"),
    })?;
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(&json))
        .and_then(|_| file.flush())
        .map_err(io_err)?;
    Ok(Lease {
        url: url.to_string(),
        kind: Kind::Local { _file: file },
    })
}

/// The lease object as written: the holder and when it was last renewed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseDoc {
    holder: Holder,
    renewed: String,
    ttl_secs: f64,
}

fn doc_bytes(holder: &Holder, ttl: Duration) -> Result<PutPayload> {
    let doc = LeaseDoc {
        holder: holder.clone(),
        renewed: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ttl_secs: ttl.as_secs_f64(),
    };
    serde_json::to_vec_pretty(&doc)
        .map(PutPayload::from)
        .map_err(|e| Error::Internal {
            detail: format!("lease JSON: {e}"),
        })
}

/// Take the lease object of an object-store out_dir (see the module docs), and start its
/// heartbeat on `rt`.
pub(crate) async fn lease_object(
    store: Arc<dyn ObjectStore>,
    path: Path,
    url: &str,
    holder: &Holder,
    ttl: Duration,
    rt: Arc<tokio::runtime::Runtime>,
) -> Result<Lease> {
    let err = |op: &'static str, e: &object_store::Error| {
        Error::store(op, url, LEASE_OBJECT.to_string(), e)
    };
    let create = PutOptions::from(PutMode::Create);
    let version = match store.put_opts(&path, doc_bytes(holder, ttl)?, create).await {
        Ok(r) => UpdateVersion {
            e_tag: r.e_tag,
            version: r.version,
        },
        Err(object_store::Error::AlreadyExists { .. }) => {
            // Someone's lease: take it over only when it is ours (a restart) or stale.
            let got = store.get(&path).await.map_err(|e| err("get", &e))?;
            let (meta_e_tag, meta_version, modified) = (
                got.meta.e_tag.clone(),
                got.meta.version.clone(),
                got.meta.last_modified,
            );
            let bytes = got.bytes().await.map_err(|e| err("get", &e))?;
            let doc: Option<LeaseDoc> = serde_json::from_slice(&bytes).ok();
            let age = (chrono::Utc::now() - modified)
                .to_std()
                .unwrap_or(Duration::ZERO);
            let same_run = doc
                .as_ref()
                .is_some_and(|d| d.holder.run_id == holder.run_id);
            let stale_after = ttl * 2;
            if !same_run && age < stale_after {
                let who = doc
                    .map(|d| d.holder.describe())
                    .unwrap_or_else(|| "another run (its lease object names no holder)".into());
                let left = stale_after - age;
                return Err(Error::Locked {
                    url: url.to_string(),
                    holder: who,
                    detail: format!(
                        "its lease {url}/{LEASE_OBJECT} was renewed {:.0} s ago; if that run is gone the lease is taken over {:.0} s from now",
                        age.as_secs_f64(),
                        left.as_secs_f64()
                    ),
                });
            }
            let take = PutOptions::from(PutMode::Update(UpdateVersion {
                e_tag: meta_e_tag,
                version: meta_version,
            }));
            match store.put_opts(&path, doc_bytes(holder, ttl)?, take).await {
                Ok(r) => {
                    if !same_run {
                        tracing::warn!(
                            "{url}: took over a stale lease (not renewed for {:.0} s): {}",
                            age.as_secs_f64(),
                            doc.map(|d| d.holder.describe())
                                .unwrap_or_else(|| "unnamed holder".into())
                        );
                    }
                    UpdateVersion {
                        e_tag: r.e_tag,
                        version: r.version,
                    }
                }
                Err(object_store::Error::Precondition { .. }) => {
                    return Err(Error::Locked {
                        url: url.to_string(),
                        holder: "another run".into(),
                        detail: "it took the lease at the same moment".into(),
                    })
                }
                Err(e) => return Err(err("put", &e)),
            }
        }
        Err(e) => return Err(err("put", &e)),
    };
    let shared = Arc::new(Shared {
        store,
        path,
        url: url.to_string(),
        holder: holder.clone(),
        version: Mutex::new(version),
        lost: AtomicBool::new(false),
        lost_to: Mutex::new(None),
    });
    let heartbeat = rt.spawn(renew_forever(Arc::clone(&shared), ttl));
    Ok(Lease {
        url: url.to_string(),
        kind: Kind::Object {
            shared,
            heartbeat,
            rt,
        },
    })
}

/// Renew the lease every `ttl / 4` until it is lost or the task is aborted. Transient errors
/// are retried at the next beat (the lease only goes stale after 2 × ttl without renewal).
async fn renew_forever(shared: Arc<Shared>, ttl: Duration) {
    let every = ttl / 4;
    loop {
        tokio::time::sleep(every).await;
        let version = match shared.version.lock() {
            Ok(v) => v.clone(),
            Err(_) => return,
        };
        let payload = match doc_bytes(&shared.holder, ttl) {
            Ok(p) => p,
            Err(_) => return,
        };
        let opts = PutOptions::from(PutMode::Update(version));
        match shared.store.put_opts(&shared.path, payload, opts).await {
            Ok(r) => {
                if let Ok(mut v) = shared.version.lock() {
                    *v = UpdateVersion {
                        e_tag: r.e_tag,
                        version: r.version,
                    };
                }
            }
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                let by = match shared.store.get(&shared.path).await {
                    Ok(g) => g
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<LeaseDoc>(&b).ok())
                        .map(|d| d.holder.describe()),
                    Err(_) => None,
                };
                if let Ok(mut g) = shared.lost_to.lock() {
                    *g = by;
                }
                shared.lost.store(true, Ordering::SeqCst);
                tracing::error!(
                    "{}: lost the out_dir's lease to another run; no more checkpoints will be written",
                    shared.url
                );
                return;
            }
            Err(e) => tracing::warn!(
                "{}: renewing the lease failed (retrying in {:.0} s): {}",
                shared.url,
                every.as_secs_f64(),
                crate::error::redact_secrets(&crate::error_chain(&e))
            ),
        }
    }
}
