//! dfs-storaged: keeps pieces of file data as ordinary files and serves them to clients.

pub mod copier;
pub mod layout;
pub mod membership;
pub mod metrics;
pub mod piece_format;
pub mod scrub;
pub mod server;
pub mod store;
