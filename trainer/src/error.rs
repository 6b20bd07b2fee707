//! Exit-code policy of the `mla` binary: bad input (config, data, checkpoint, flags) exits 2
//! with one line naming the culprit; anything else exits 1.

use std::fmt;

/// A user-input problem not already carried by a typed error (e.g. a bad flag combination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Exit code for an error chain: 2 when any link is a user-input error.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let input = err.chain().any(|e| {
        e.is::<BadInput>()
            || e.is::<crate::config::ConfigError>()
            || e.is::<mla_model::ModelError>()
            || e.downcast_ref::<crate::data::DataError>()
                .is_some_and(|d| d.is_bad_input())
    });
    if input {
        2
    } else {
        1
    }
}
