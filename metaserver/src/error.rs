//! Metaserver errors: either a filesystem answer for the client (not found, exists, ...) or a
//! failure of the metaserver's own database.

use dfs_proto::{ErrorKind, RemoteError};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// An answer the client maps to an errno.
    #[error("{0}")]
    Fs(RemoteError),
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record {what}: {source}")]
    Corrupt {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("metadata log {path}: cannot {op}: {source}")]
    Log {
        path: std::path::PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata log {path}: {reason}")]
    LogDamaged { path: std::path::PathBuf, reason: String },
    #[error("metaserver is shutting down")]
    ShuttingDown,
    #[error("metadata commit failed: {0}")]
    CommitFailed(String),
}

macro_rules! db_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaError {
            fn from(e: $t) -> Self {
                MetaError::Db(e.into())
            }
        }
    )*};
}
db_error_from!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

impl From<RemoteError> for MetaError {
    fn from(e: RemoteError) -> Self {
        MetaError::Fs(e)
    }
}

impl MetaError {
    pub fn fs(kind: ErrorKind, message: impl Into<String>) -> Self {
        MetaError::Fs(RemoteError::new(kind, message))
    }

    /// What the client is told. Internal failures become `Io` with the cause attached.
    pub fn to_remote(&self) -> RemoteError {
        match self {
            MetaError::Fs(e) => e.clone(),
            other => RemoteError::new(ErrorKind::Io, format!("metaserver: {other}")),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            MetaError::Fs(e) => e.kind,
            _ => ErrorKind::Io,
        }
    }
}

pub fn not_found(what: impl std::fmt::Display) -> MetaError {
    MetaError::fs(ErrorKind::NotFound, format!("{what} does not exist"))
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;
