//! Errors of file operations: each carries the errno the application sees and a message naming
//! what failed (inode, piece, node) for the log.

use dfs_proto::{ErrorKind, RpcError};

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    pub errno: i32,
    pub message: String,
}

impl FsError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        FsError {
            errno,
            message: message.into(),
        }
    }

    pub fn io(message: impl Into<String>) -> Self {
        FsError::new(libc::EIO, message)
    }

    /// Whether this is an ordinary answer (ENOENT, EEXIST...) rather than a failure an
    /// operator should hear about.
    pub fn is_routine(&self) -> bool {
        matches!(
            self.errno,
            libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EINVAL
                | libc::ENAMETOOLONG
                | libc::EPERM
                | libc::EACCES
                | libc::ENODATA
                | libc::ERANGE
                | libc::EMLINK
                | libc::EAGAIN
                | libc::EOPNOTSUPP
                | libc::ESTALE
        )
    }

    pub fn kind_is(&self, kind: ErrorKind) -> bool {
        self.errno == kind.errno()
    }
}

impl From<RpcError> for FsError {
    fn from(e: RpcError) -> Self {
        let errno = match e.remote_kind() {
            Some(kind) => kind.errno(),
            None => libc::EIO,
        };
        FsError::new(errno, e.to_string())
    }
}

impl From<dfs_proto::RemoteError> for FsError {
    fn from(e: dfs_proto::RemoteError) -> Self {
        FsError::new(e.kind.errno(), e.message)
    }
}

pub type FsResult<T> = Result<T, FsError>;
