//! SIGTERM/SIGINT handling for `mla train`: the first signal asks the loop to stop at the next
//! optimizer-step boundary, write a checkpoint of that step and exit 0 (what `mla-launch`
//! relies on); a second one terminates immediately.
//! `mla prepare` installs the same handlers, and data preparation (also first-use tokenization
//! in `mla train`) polls [`stop_requested`] and gives up with `DataError::Interrupted`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Install the handlers (idempotent).
pub fn install() {
    STOP.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            // Second signal: exit right away (130/143 as a shell would report).
            let _ =
                signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&flag));
            let _ = signal_hook::flag::register(sig, Arc::clone(&flag));
        }
        flag
    });
}

/// Whether a stop was requested.
pub fn stop_requested() -> bool {
    STOP.get().is_some_and(|f| f.load(Ordering::Relaxed))
}
