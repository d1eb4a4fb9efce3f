//! Requests answered at once from what this mount already holds, on the FUSE request thread:
//! no task is spawned and the runtime's thread is not woken. On these VMs a thread wakeup
//! costs more than the work of most requests (a getxattr answered from the cache took ~115 us
//! through the runtime, measured from the FUSE request to its reply), and `ls -l` makes one
//! getxattr per entry, every write one for `security.capability`, every close a flush.
//!
//! Each function returns `None` when the answer needs the network or has to wait (a lock, a
//! commit, a writer busy elsewhere); the caller then takes the usual asynchronous path, which
//! gives the same answer. Nothing here may block: only `std` mutexes held for a few
//! instructions, and `try_lock` on the async ones.

use std::sync::atomic::Ordering;

use dfs_proto::types::{Attr, Ino};

use super::{Mount, no_attribute, show};
use crate::error::{FsError, FsResult};

impl Mount {
    /// getattr from attributes fresher than the attribute timeout.
    pub fn getattr_now(&self, ino: Ino) -> Option<Attr> {
        self.attrs.get(ino).map(|cached| self.visible(cached))
    }

    /// getxattr from the cache of answers, or from attributes saying the inode has none.
    pub fn getxattr_now(&self, ino: Ino, name: &[u8]) -> Option<FsResult<Vec<u8>>> {
        if name.starts_with(b"system.") {
            // ACLs and the like need the kernel's interpretation, which dfs does not offer.
            return Some(Err(FsError::new(
                libc::EOPNOTSUPP,
                format!("inode {ino}: attribute {:?} is not supported", show(name)),
            )));
        }
        let answer = match self.xattrs.get(ino, name) {
            Some(answer) => answer,
            None if self.known_without_xattrs(ino) => None,
            None => return None,
        };
        Some(answer.ok_or_else(|| no_attribute(ino, name)))
    }

    /// listxattr of an inode known to have no extended attributes.
    pub fn listxattr_now(&self, ino: Ino) -> Option<FsResult<Vec<u8>>> {
        self.known_without_xattrs(ino).then(|| Ok(Vec::new()))
    }

    /// `close()` of a descriptor of a file with nothing to commit on this mount and no lock of
    /// `owner` to drop: what `flush` followed by `unlock_owner` would answer.
    pub fn flush_now(&self, ino: Ino, fh: u64, owner: u64) -> Option<FsResult<()>> {
        if self.meta.holds_lock(ino, Some(owner)) {
            return None;
        }
        let Some(state) = self.state(ino) else {
            return Some(Ok(()));
        };
        {
            let mut w = state.writer.try_lock().ok()?;
            if !w.is_idle() {
                return None;
            }
            // As after a commit with nothing to do: attribute changes now go out at once.
            w.fresh = false;
        }
        Some(match self.handle(fh) {
            Some(handle) => handle.check_close(owner, &state.errors),
            None => Ok(()),
        })
    }

    /// The release of open file `fh` of `ino` when nothing is left to do for it: it is not the
    /// inode's last handle here, or the last one with nothing to commit and no lock held
    /// (`flock_owner` is the open file's flock owner, if it had one). What `release` would do.
    pub fn release_now(&self, ino: Ino, fh: u64, flock_owner: Option<u64>) -> Option<FsResult<()>> {
        if flock_owner.is_some_and(|owner| self.meta.holds_lock(ino, Some(owner))) {
            return None;
        }
        let Some(handle_ino) = self.handle(fh).map(|h| h.ino) else {
            return Some(Ok(()));
        };
        if let Some(state) = self.state(handle_ino) {
            let holds_locks = self.meta.holds_lock(handle_ino, None);
            let mut inodes = self.inodes.lock().expect("inodes");
            let last = state.handles.load(Ordering::Acquire) == 1;
            if last {
                // Held until the handle is gone, so no commit can start in between.
                let mut w = state.writer.try_lock().ok()?;
                if !w.is_idle() || holds_locks {
                    return None;
                }
                w.fresh = false;
                state.handles.fetch_sub(1, Ordering::AcqRel);
                if !state.is_dirty() {
                    inodes.remove(&handle_ino);
                }
            } else {
                state.handles.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.files.lock().expect("files").remove(&fh);
        self.meta.release(fh, handle_ino);
        Some(Ok(()))
    }
}
