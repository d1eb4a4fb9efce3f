//! dfs-metaserver: owns the namespace, decides where data goes, tracks storage daemons.
//! File data never passes through it: it hands out locations and clients talk to the daemons.

pub mod backup;
pub mod committer;
pub mod db;
pub mod error;
pub mod healer;
pub mod locks;
pub mod logged;
pub mod metrics;
pub mod namespace;
pub mod registry;
pub mod repair;
pub mod schema;
pub mod server;
pub mod service;
pub mod sessions;
pub mod wal;

#[cfg(test)]
mod service_tests;
