//! dfs-storaged: keeps pieces of file data as ordinary files and serves them to clients.

pub mod layout;
pub mod membership;
pub mod server;
pub mod store;
