//! Logging for every dfs process: human-readable lines on stderr, filtered by `RUST_LOG`
//! (default `info`), each prefixed with the process role so interleaved logs stay readable.

use tracing_subscriber::EnvFilter;

pub fn init(role: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,quinn=warn,fuser=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .try_init();
    tracing::debug!("{role} logging started");
}
