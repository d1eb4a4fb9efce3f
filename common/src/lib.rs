//! What every dfs binary shares: the `dfs.toml` configuration, logging set-up and process
//! plumbing (signals, mount table).

pub mod config;
pub mod logging;
pub mod process;

pub use config::Config;
