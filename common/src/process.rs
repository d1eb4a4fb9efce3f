//! Process plumbing shared by the daemons and tools: shutdown signals and mount-table queries.

use std::path::{Path, PathBuf};

/// SIGTERM and SIGINT, caught from the moment this is created (so that a signal arriving
/// while a process is still starting is not fatal).
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Must be called within a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves when either signal has arrived (including before this call).
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    ShutdownSignals::install()
        .expect("install signal handlers")
        .recv()
        .await
}

/// Decodes the octal escapes (`\040` for space...) used in /proc/self/mountinfo.
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The file system type and source mounted exactly at `path` (e.g. `fuse`, `dfs`), if any.
pub fn mounted_fs(path: &Path) -> Option<(String, String)> {
    let want = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Later lines are newer mounts: the last match is what the path shows.
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if unescape_mountinfo(fields.get(4)?) != want {
            return None;
        }
        let fs_type = fields.get(sep + 1)?.to_string();
        let source = fields.get(sep + 2).map(|s| s.to_string()).unwrap_or_default();
        Some((fs_type, source))
    })
}

/// The file system type mounted exactly at `path`, if any.
pub fn mounted_fs_type(path: &Path) -> Option<String> {
    mounted_fs(path).map(|(fs_type, _)| fs_type)
}

/// Whether a dfs file system (FUSE, source `dfs`) is mounted at `path`.
pub fn is_dfs_mounted(path: &Path) -> bool {
    mounted_fs(path).is_some_and(|(fs_type, source)| fs_type.starts_with("fuse") && source == "dfs")
}

/// Unmounts `path`; with `lazy`, detaches even if busy (or its daemon is gone).
pub fn unmount(path: &Path, lazy: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), PathBuf::from("/mnt/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn root_is_mounted() {
        assert!(mounted_fs_type(Path::new("/")).is_some());
        assert!(!is_dfs_mounted(Path::new("/")));
    }
}
