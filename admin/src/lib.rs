//! The `dfs` admin tool's library: local cluster directories, status reports, `dfs up`.

pub mod drain;
pub mod local;
pub mod locate;
pub mod metrics_view;
pub mod mount_helper;
pub mod replicas;
pub mod status;
pub mod up;
