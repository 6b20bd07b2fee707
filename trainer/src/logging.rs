//! Log setup: `tracing` to stderr, level from `RUST_LOG` (default info). Results (JSON,
//! generated text) go to stdout, so logs never mix into them.

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
