//! Errors that cross the wire: a kind the receiver can map to an errno, plus a message
//! naming what failed (path component, inode, node, piece) for the operator.

use serde::{Deserialize, Serialize};

/// Classes of failure a remote peer reports. Each maps to exactly one errno.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    NotEmpty,
    NotDirectory,
    IsDirectory,
    /// No storage daemon can take new data (none registered, all down or all full).
    NoSpace,
    InvalidArgument,
    NameTooLong,
    NotPermitted,
    PermissionDenied,
    /// A storage daemon holding the data is down or unreachable.
    StorageUnavailable,
    /// The peer could not complete the operation (disk error, internal failure).
    Io,
    /// The object changed or vanished in a way the request did not expect.
    Stale,
    TooManyLinks,
    NoAttribute,
    OutOfRange,
    Unsupported,
    /// The request was well-formed but the peer refuses it in its current state.
    Busy,
    /// Stored data failed its checksum.
    Corrupt,
}

impl ErrorKind {
    /// The errno a POSIX caller should see for this kind.
    pub fn errno(self) -> i32 {
        use ErrorKind::*;
        match self {
            NotFound => libc_errno::ENOENT,
            AlreadyExists => libc_errno::EEXIST,
            NotEmpty => libc_errno::ENOTEMPTY,
            NotDirectory => libc_errno::ENOTDIR,
            IsDirectory => libc_errno::EISDIR,
            NoSpace => libc_errno::ENOSPC,
            InvalidArgument => libc_errno::EINVAL,
            NameTooLong => libc_errno::ENAMETOOLONG,
            NotPermitted => libc_errno::EPERM,
            PermissionDenied => libc_errno::EACCES,
            StorageUnavailable | Io | Corrupt => libc_errno::EIO,
            Stale => libc_errno::ESTALE,
            TooManyLinks => libc_errno::EMLINK,
            NoAttribute => libc_errno::ENODATA,
            OutOfRange => libc_errno::ERANGE,
            Unsupported => libc_errno::EOPNOTSUPP,
            Busy => libc_errno::EBUSY,
        }
    }
}

/// Linux errno values, kept here so the protocol crate does not need libc.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EACCES: i32 = 13;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EMLINK: i32 = 31;
    pub const ERANGE: i32 = 34;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOTEMPTY: i32 = 39;
    pub const ENODATA: i32 = 61;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESTALE: i32 = 116;
}

/// An error reported by a remote peer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RemoteError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RemoteError {
            kind,
            message: message.into(),
        }
    }
}
