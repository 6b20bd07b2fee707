//! `mla-launch`: spawns and supervises `mla train` ranks — a thin shell over `mla_launcher::run`.
//! Errors print as one line; the exit code is the first failing rank's (128+signal for a
//! signal), 2 for bad flags or input, 1 for the launcher's own failures.

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<_> = std::env::args_os().skip(1).collect();
    if let Some(code) = mla_launcher::shim::maybe_run(&argv) {
        return ExitCode::from(code);
    }
    init_logging();
    let _span = tracing::info_span!("mla-launch").entered();
    match mla_launcher::run(argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mla-launch: error: {e:#}");
            ExitCode::from(mla_launcher::exit_code(&e))
        }
    }
}

/// `tracing` to stderr, level from `RUST_LOG` (default info); rank output goes through untouched.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
