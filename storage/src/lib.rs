//! mla-storage: the checkpoint store (local disk, S3, memory) behind `out_dir`. No tch.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
