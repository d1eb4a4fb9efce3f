//! What every dfs binary shares: the `dfs.toml` configuration, logging set-up, metrics and
//! process plumbing (signals, mount table).

pub mod config;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod token;

pub use config::Config;
