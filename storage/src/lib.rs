//! mla-storage: the checkpoint store (local disk, S3, memory) behind `out_dir`. No tch.
//!
//! Bytes and manifests only: the trainer turns tensors into named byte objects, this crate
//! stores them under `out_dir/step-00000400/` (or `final/`) with the manifest-last protocol
//! (DESIGN §6, `storage/README.md`): a step exists iff its `manifest.json` is present and valid,
//! and it is trusted only after every object's size and sha256 verify.
//!
//! * [`CheckpointStore`] — async API (write, verify, list, latest valid, retention, resolve).
//! * [`BlockingCheckpointStore`] — the same for synchronous callers.
//! * [`BackgroundSaver`] — uploads while training continues, one save at a time.
//! * [`Lease`] — one run at a time per out_dir (lock file or conditional-PUT lease object);
//!   `probe`, `clean_leftovers`, `delete_all_steps` — taking charge of an out_dir.
//! * [`open_location`] — the same URL parsing and backends for other objects (token datasets).
//! * [`formats`] — readers of tensor files from outside (`torch.save`, safetensors), every
//!   limit on their untrusted bytes in [`formats::Limits`].
//! * [`open_file`], [`create_dir`] — the files mla writes into a local out_dir beside the
//!   store (metrics), opened without following links (`local.rs`).
//!
//! Not here: tensors (the trainer builds them from what `formats` checked), resume policy,
//! config checks (trainer).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod blocking;
mod delay;
mod error;
pub mod formats;
mod lease;
mod local;
mod location;
mod manifest;
mod options;
mod outdir;
mod saver;
mod store;

pub use blocking::BlockingCheckpointStore;
pub use bytes::{Bytes, BytesMut};
pub use error::{
    error_chain, redact_secrets, redact_userinfo, Corruption, Error, Result, StoreErrorKind,
};
pub use lease::{Holder, Lease, DEFAULT_TTL, ENV_LEASE_TTL_SECS, LEASE_OBJECT, LOCK_FILE};
pub use local::{create_dir, open_file, OpenMode};
pub use location::{check_location, open_location, ObjectLocation};
pub use manifest::{
    check_object_name, sha256_hex, Manifest, ManifestMeta, ObjectEntry, StepName, FINAL_DIR,
    FORMAT_VERSION, MANIFEST_NAME,
};
/// The backend trait, for [`CheckpointStore::from_object_store`].
pub use object_store;
pub use options::{
    RetryOptions, StoreOptions, ENV_CONNECT_TIMEOUT_SECS, ENV_MAX_RETRIES, ENV_READ_TIMEOUT_SECS,
    ENV_REQUEST_TIMEOUT_SECS, ENV_RETRY_TIMEOUT_SECS, ENV_TEST_PUT_DELAY_MS,
};
pub use outdir::Leftovers;
pub use saver::{BackgroundSaver, SaveJob, SaveReport};
pub use store::{
    is_invalid_step, upload_bytes, CheckpointStore, Latest, LoadedStep, PutOutcome, RetainReport,
    SkippedStep, StepInfo, Uploaded, Verification, VerifiedStep, MAX_MANIFEST_BYTES,
};
