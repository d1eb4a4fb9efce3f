//! `dfs replicas PATH [N]`: the replication factor of a file or directory on a dfs mount.
//! It is the `user.dfs.replicas` extended attribute: a directory's passes to what is created
//! in it; a file's applies to its data (changing it makes the metaserver add or drop copies).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub const XATTR: &str = "user.dfs.replicas";

#[derive(Debug, thiserror::Error)]
pub enum ReplicasError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: path contains a NUL byte")]
    BadPath(String),
    #[error("{0} is not on a dfs mount (the replication factor is an attribute dfs stores)")]
    NotDfs(String),
}

/// Refuses paths outside a dfs mount: elsewhere `user.dfs.replicas` would be stored as a
/// meaningless attribute of a local file.
fn check_on_dfs(path: &Path) -> Result<(), ReplicasError> {
    let full = path.canonicalize().map_err(|source| ReplicasError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let on_dfs = full
        .ancestors()
        .find_map(dfs_common::process::mounted_fs)
        .is_some_and(|(fs_type, source)| fs_type.starts_with("fuse") && source == "dfs");
    if on_dfs {
        Ok(())
    } else {
        Err(ReplicasError::NotDfs(path.display().to_string()))
    }
}

fn c_path(path: &Path) -> Result<CString, ReplicasError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ReplicasError::BadPath(path.display().to_string()))
}

fn io_error(path: &Path) -> ReplicasError {
    ReplicasError::Io {
        path: path.display().to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// The factor set on `path` itself, or None (the cluster default applies).
pub fn get(path: &Path) -> Result<Option<u8>, ReplicasError> {
    check_on_dfs(path)?;
    let p = c_path(path)?;
    let name = CString::new(XATTR).expect("no NUL");
    let mut buf = [0u8; 16];
    // SAFETY: valid C strings and a buffer of the size passed.
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(None);
        }
        return Err(ReplicasError::Io {
            path: path.display().to_string(),
            source: e,
        });
    }
    Ok(std::str::from_utf8(&buf[..n as usize])
        .ok()
        .and_then(|s| s.trim().parse().ok()))
}

pub fn set(path: &Path, replicas: u8) -> Result<(), ReplicasError> {
    check_on_dfs(path)?;
    let p = c_path(path)?;
    let name = CString::new(XATTR).expect("no NUL");
    let value = replicas.to_string();
    // SAFETY: valid C strings and a value buffer of the length passed.
    let r = unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r != 0 {
        return Err(io_error(path));
    }
    Ok(())
}
