//! Notifications to the kernel (dropping an inode's cached pages and attributes), made from a
//! thread of their own.
//!
//! Invalidating an inode's pages can wait inside the kernel for the writeback of dirty pages of
//! a shared mapping (a SQLite `-shm` file, say), and that writeback is a FUSE WRITE that only
//! this mount can answer. Made from an async worker, the call would block the worker that has
//! to answer it: the mount hangs. So no async task ever makes the call itself; it hands it to
//! this thread and waits (with a deadline) without blocking anything.

use std::sync::mpsc;
use std::time::Duration;

use dfs_proto::types::Ino;
use tokio::sync::oneshot;

/// Longest an invalidation is waited for; it carries on in the background after that.
const INVAL_WAIT: Duration = Duration::from_secs(5);

/// What to drop: the attributes only, or the pages too.
#[derive(Clone, Copy)]
enum What {
    Attributes,
    Everything,
}

type Request = (Ino, What, Option<oneshot::Sender<()>>);

pub struct KernelCache {
    requests: mpsc::Sender<Request>,
}

impl KernelCache {
    pub fn start(notifier: fuser::Notifier) -> Self {
        let (requests, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("kernel-inval".into())
            .spawn(move || {
                while let Ok((ino, what, done)) = rx.recv() {
                    // A negative offset drops the attributes only (no page is waited for).
                    let offset = match what {
                        What::Attributes => -1,
                        What::Everything => 0,
                    };
                    if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), offset, 0)
                        && e.raw_os_error() != Some(libc::ENOENT)
                    {
                        tracing::debug!("inode {ino}: cannot invalidate the kernel's cache: {e}");
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            })
            .expect("spawn the kernel notification thread");
        KernelCache { requests }
    }

    /// Drops the kernel's cached pages and attributes of `ino`, waiting until done (or
    /// [`INVAL_WAIT`] passed: the kernel may be waiting for this mount to answer a write).
    pub async fn invalidate(&self, ino: Ino) {
        self.wait_for(ino, What::Everything).await
    }

    /// Drops the kernel's cached attributes (size, times) of `ino`, waiting until done.
    pub async fn invalidate_attributes(&self, ino: Ino) {
        self.wait_for(ino, What::Attributes).await
    }

    async fn wait_for(&self, ino: Ino, what: What) {
        let (tx, rx) = oneshot::channel();
        if self.requests.send((ino, what, Some(tx))).is_err() {
            return;
        }
        if tokio::time::timeout(INVAL_WAIT, rx).await.is_err() {
            tracing::warn!("inode {ino}: the kernel has not dropped its cached pages within {INVAL_WAIT:?}; going on");
        }
    }

    /// Asks for the invalidation without waiting for it.
    pub fn invalidate_soon(&self, ino: Ino) {
        let _ = self.requests.send((ino, What::Everything, None));
    }
}
