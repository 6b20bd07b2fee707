//! [`BadInput`]: a user-input problem (config, data, checkpoint, flags) that no typed error
//! carries; the binary exits 2 for it, with one line naming the culprit (the exit-code policy
//! is `cli::exit_code`, above every error type it knows).

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
