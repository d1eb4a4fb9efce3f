//! The FUSE adapter. A request the mount can answer from what it holds is answered at once
//! on the FUSE thread (`ops/local.rs`); every other callback copies its arguments, spawns the
//! operation on tokio and replies when it completes, so the request loop never waits on the
//! network. Each operation also runs under an overall deadline: whatever happens remotely,
//! the kernel gets an answer.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use dfs_proto::meta::{AttrChanges, MakeNode, Rename, RenameMode, SetAttr, TimeSet};
use dfs_proto::types::{Attr, FileKind};
use fuser::{
    BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use futures_util::FutureExt;
use tokio::runtime::Handle;

use dfs_common::metrics::RequestMetrics;

use crate::dir::{DirHandle, FIRST_ENTRY};
use crate::error::{FsError, FsResult};
use crate::ops::Mount;

/// No operation may take longer than this, whatever the network does.
const OP_DEADLINE: Duration = Duration::from_secs(90);
/// Block size reported in stat(): large, so that cp and friends use large buffers.
const BLKSIZE: u32 = 1 << 20;

pub struct DfsFs {
    mount: Arc<Mount>,
    rt: Handle,
    attr_ttl: Duration,
    entry_ttl: Duration,
    /// Every FUSE request, by operation (`lookup`, `create`, `write`...).
    requests: RequestMetrics,
}

impl DfsFs {
    pub fn new(
        mount: Arc<Mount>,
        rt: Handle,
        attr_ttl: Duration,
        entry_ttl: Duration,
        requests: RequestMetrics,
    ) -> Self {
        DfsFs {
            mount,
            rt,
            attr_ttl,
            entry_ttl,
            requests,
        }
    }

    /// Runs `op` as its own task, then `done` with its result. If the deadline passes first,
    /// the kernel gets EIO, but the operation is not cancelled (half-done work, such as a
    /// commit, is never abandoned midway): it finishes in the background, in the same task.
    /// (One task per request: a second one to watch the first costs a wakeup per request.)
    fn run<T, F, D>(&self, what: &'static str, op: F, done: D)
    where
        T: Send + 'static,
        F: Future<Output = FsResult<T>> + Send + 'static,
        D: FnOnce(FsResult<T>) + Send + 'static,
    {
        let timer = self.requests.start(what);
        self.rt.spawn(async move {
            let op = std::panic::AssertUnwindSafe(op).catch_unwind();
            tokio::pin!(op);
            let deadline = tokio::time::sleep(OP_DEADLINE);
            tokio::pin!(deadline);
            let (result, late) = tokio::select! {
                biased;
                r = &mut op => (r.unwrap_or_else(|_| Err(FsError::io(format!("{what} failed: it panicked")))), false),
                _ = &mut deadline => (Err(FsError::io(format!("{what} did not complete within {OP_DEADLINE:?}"))), true),
            };
            log_failure(what, &result);
            timer.done(result.as_ref().err().map(|e| errno_name(e.errno)));
            done(result);
            if late {
                let _ = op.await;
            }
        });
    }

    /// Replies at once, on this thread, with an answer the mount had without waiting
    /// (`ops/local.rs`), counted like the requests `run` answers.
    fn answer<T>(&self, what: &'static str, result: FsResult<T>, done: impl FnOnce(FsResult<T>)) {
        let timer = self.requests.start(what);
        log_failure(what, &result);
        timer.done(result.as_ref().err().map(|e| errno_name(e.errno)));
        done(result);
    }
}

fn log_failure<T>(what: &str, result: &FsResult<T>) {
    if let Err(e) = result {
        if e.is_routine() {
            tracing::debug!("{what}: {e}");
        } else {
            tracing::warn!("{what} failed: {e}");
        }
    }
}

/// A metrics label for an errno: its usual name.
fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ENOSPC => "ENOSPC",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ESTALE => "ESTALE",
        libc::EAGAIN => "EAGAIN",
        libc::ENODATA => "ENODATA",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EROFS => "EROFS",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINTR => "EINTR",
        libc::EBUSY => "EBUSY",
        libc::EXDEV => "EXDEV",
        libc::ERANGE => "ERANGE",
        libc::EMLINK => "EMLINK",
        libc::EDEADLK => "EDEADLK",
        libc::ENOLCK => "ENOLCK",
        libc::EBADF => "EBADF",
        libc::EFBIG => "EFBIG",
        other => return format!("errno {other}"),
    };
    name.to_owned()
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno)
}

pub fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::RegularFile => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.stored_bytes.div_ceil(512),
        atime: a.atime.into(),
        mtime: a.mtime.into(),
        ctime: a.ctime.into(),
        crtime: a.ctime.into(),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Inode number 0 tells the kernel "no such entry" while letting it cache that answer.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(t.into()),
    }
}

fn name(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

impl Filesystem for DfsFs {
    // FUSE_AUTO_INVAL_DATA is left off on purpose: it drops cached pages whenever the mtime the
    // kernel sees changes, which includes this mount's own writes. Cached pages are instead
    // kept or dropped at open (close-to-open: kept only if the file is the version this mount
    // cached) and dropped when a lock is granted.
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        if let Err(max) = config.set_max_readahead(4 << 20) {
            let _ = config.set_max_readahead(max);
        }
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS;
        let supported = wanted & config.capabilities();
        let _ = config.add_capabilities(supported);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        let (m, ttl) = (self.mount.clone(), self.entry_ttl);
        let n = name(n);
        let done = move |r: FsResult<Attr>| match r {
            Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
            // A negative entry: the kernel remembers the name is absent for the entry timeout,
            // sparing a round trip before every create or mkdir of a new name.
            Err(e) if e.errno == libc::ENOENT => reply.entry(&ttl, &negative_entry(), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        };
        if m.known_absent(parent.0, &n) {
            // A new name in a directory this mount made (tar, cp -r): no round trip.
            let absent = FsError::new(libc::ENOENT, "known absent".to_owned());
            return self.answer("lookup_known_absent", Err(absent), done);
        }
        self.run("lookup", async move { m.lookup(parent.0, n).await }, done);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (m, ttl) = (self.mount.clone(), self.attr_ttl);
        let done = move |r: FsResult<Attr>| match r {
            Ok(a) => reply.attr(&ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        };
        match m.getattr_now(ino.0) {
            Some(attr) => self.answer("getattr", Ok(attr), done),
            None => self.run("getattr", async move { m.getattr(ino.0).await }, done),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (m, ttl) = (self.mount.clone(), self.attr_ttl);
        let request = SetAttr {
            ino: ino.0,
            changes: AttrChanges {
                perm: mode.map(|m| m & 0o7777),
                uid,
                gid,
                atime: atime.map(time_set),
                mtime: mtime.map(time_set),
            },
            size,
            ctime: ctime.map(Into::into),
        };
        self.run("setattr", async move { m.setattr(request).await }, move |r| match r {
            Ok(a) => reply.attr(&ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let m = self.mount.clone();
        self.run("readlink", async move { m.readlink(ino.0).await }, move |r| match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, n: &OsStr, mode: u32, _umask: u32, rdev: u32, reply: ReplyEntry) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::RegularFile,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => return reply.error(Errno::EINVAL),
        };
        self.make(req, parent, n, kind, mode, rdev, Vec::new(), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, n: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        self.make(req, parent, n, FileKind::Directory, mode, 0, Vec::new(), reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let target = target.as_os_str().as_bytes().to_vec();
        self.make(req, parent, link_name, FileKind::Symlink, 0o777, 0, target, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let m = self.mount.clone();
        let n = name(n);
        self.run("unlink", async move { m.unlink(parent.0, n).await }, move |r| {
            empty(r, reply)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let m = self.mount.clone();
        let n = name(n);
        self.run("rmdir", async move { m.rmdir(parent.0, n).await }, move |r| {
            empty(r, reply)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        } else if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else {
            RenameMode::Replace
        };
        let m = self.mount.clone();
        let request = Rename {
            parent: parent.0,
            name: name(n),
            new_parent: new_parent.0,
            new_name: name(new_name),
            mode,
        };
        self.run("rename", async move { m.rename(request).await }, move |r| {
            empty(r, reply)
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, new_parent: INodeNo, new_name: &OsStr, reply: ReplyEntry) {
        let (m, ttl) = (self.mount.clone(), self.entry_ttl);
        let n = name(new_name);
        self.run(
            "link",
            async move { m.link(ino.0, new_parent.0, n).await },
            move |r| match r {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let m = self.mount.clone();
        let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        self.run("open", async move { m.open(ino.0, writable).await }, move |r| match r {
            Ok(o) => reply.opened(FileHandle(o.fh), open_flags(o.keep_cache, o.direct_io)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let m = self.mount.clone();
        self.run(
            "read",
            async move { m.read(ino.0, offset, size).await },
            move |r| match r {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let m = self.mount.clone();
        let data = Bytes::copy_from_slice(data);
        self.run(
            "write",
            async move { m.write(ino.0, offset, data).await },
            move |r| match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    /// Copies within the cluster: whole chunks daemon to daemon, the rest through the mount
    /// (without it the kernel would pull every byte through here and push it back).
    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let m = self.mount.clone();
        self.run(
            "copy_file_range",
            async move { m.copy_range(ino_in.0, offset_in, ino_out.0, offset_out, len).await },
            move |r| match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        let m = self.mount.clone();
        if let Some(answer) = m.flush_now(ino.0, fh.0, lock_owner.0) {
            return self.answer("flush", answer, move |r| empty(r, reply));
        }
        self.run(
            "flush",
            async move {
                let flushed = m.flush(ino.0, fh.0, lock_owner.0).await;
                // A process closing any descriptor of a file loses its fcntl locks on it.
                m.unlock_owner(ino.0, lock_owner.0).await?;
                flushed
            },
            move |r| empty(r, reply),
        );
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let m = self.mount.clone();
        if let Some(answer) = m.release_now(ino.0, fh.0, lock_owner.map(|o| o.0)) {
            return self.answer("release", answer, move |r| empty(r, reply));
        }
        self.run(
            "release",
            async move {
                // Set when the open file held an flock: it goes with the open file.
                if let Some(owner) = lock_owner {
                    m.unlock_owner(ino.0, owner.0).await?;
                }
                m.release(fh.0).await
            },
            move |r| empty(r, reply),
        );
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let m = self.mount.clone();
        self.run("fsync", async move { m.fsync(ino.0, fh.0).await }, move |r| {
            empty(r, reply)
        });
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let m = self.mount.clone();
        self.run("fsyncdir", async move { m.fsyncdir(ino.0).await }, move |r| {
            empty(r, reply)
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let m = self.mount.clone();
        self.run("opendir", async move { m.opendir(ino.0).await }, move |r| match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let m = self.mount.clone();
        self.rt.spawn(async move {
            let listed = list_dir(&m, fh, offset, |pos, ino, kind, name, _attr| {
                reply.add(INodeNo(ino), pos + 1, kind, name)
            })
            .await;
            match listed {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let (m, ttl) = (self.mount.clone(), self.entry_ttl);
        self.rt.spawn(async move {
            let listed = list_dir(&m, fh, offset, |pos, ino, _kind, name, attr| {
                reply.add(INodeNo(ino), pos + 1, name, &ttl, &file_attr(attr), Generation(0))
            })
            .await;
            match listed {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.mount.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let m = self.mount.clone();
        self.run("statfs", async move { m.statfs().await }, move |r| match r {
            Ok(s) => {
                const BLOCK: u64 = 4096;
                let files = s.inodes;
                reply.statfs(
                    s.capacity_bytes / BLOCK,
                    s.free_bytes / BLOCK,
                    s.free_bytes / BLOCK,
                    files + (1 << 32),
                    1 << 32,
                    BLOCK as u32,
                    255,
                    BLOCK as u32,
                )
            }
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        let m = self.mount.clone();
        let n = name(n);
        let done = move |r| xattr_reply(r, size, reply);
        match m.getxattr_now(ino.0, &n) {
            Some(answer) => self.answer("getxattr", answer, done),
            None => self.run("getxattr", async move { m.getxattr(ino.0, n).await }, done),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let m = self.mount.clone();
        let done = move |r| xattr_reply(r, size, reply);
        match m.listxattr_now(ino.0) {
            Some(answer) => self.answer("listxattr", answer, done),
            None => self.run("listxattr", async move { m.listxattr(ino.0).await }, done),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let m = self.mount.clone();
        let (n, value) = (name(n), value.to_vec());
        self.run(
            "setxattr",
            async move { m.setxattr(ino.0, n, value, flags).await },
            move |r| empty(r, reply),
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let m = self.mount.clone();
        let n = name(n);
        self.run("removexattr", async move { m.removexattr(ino.0, n).await }, move |r| {
            empty(r, reply)
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let m = self.mount.clone();
        self.run(
            "fallocate",
            async move { m.fallocate(ino.0, offset, length, mode).await },
            move |r| empty(r, reply),
        );
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let m = self.mount.clone();
        self.run(
            "getlk",
            async move { m.getlk(ino.0, lock_owner.0, start, end, typ).await },
            move |r| match r {
                Ok(Some((start, end, typ, pid))) => reply.locked(start, end, typ, pid),
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let m = self.mount.clone();
        let pid = if pid != 0 { pid } else { req.pid() };
        let op = async move { m.setlk(ino.0, lock_owner.0, pid, start, end, typ, sleep).await };
        if sleep {
            // A blocking lock waits as long as the conflicting lock is held, as on a local
            // disk; it ends when granted or when the waiting process is gone.
            self.rt.spawn(async move {
                let r = op.await;
                if let Err(e) = &r
                    && !e.is_routine()
                {
                    tracing::warn!("setlkw failed: {e}");
                }
                empty(r, reply)
            });
        } else {
            self.run("setlk", op, move |r| empty(r, reply));
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (m, ttl) = (self.mount.clone(), self.entry_ttl);
        let n = name(n);
        let (uid, gid) = (req.uid(), req.gid());
        let exclusive = flags & libc::O_EXCL != 0;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        self.run(
            "create",
            async move {
                m.create(parent.0, n, mode & 0o7777, uid, gid, exclusive, writable)
                    .await
            },
            move |r| match r {
                Ok(o) => reply.created(
                    &ttl,
                    &file_attr(&o.attr),
                    Generation(0),
                    FileHandle(o.fh),
                    open_flags(false, o.direct_io),
                ),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }
}

impl DfsFs {
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        kind: FileKind,
        mode: u32,
        rdev: u32,
        target: Vec<u8>,
        reply: ReplyEntry,
    ) {
        let (m, ttl) = (self.mount.clone(), self.entry_ttl);
        let request = MakeNode {
            parent: parent.0,
            name: name(n),
            kind,
            perm: mode & 0o7777,
            uid: req.uid(),
            gid: req.gid(),
            rdev,
            target,
        };
        self.run("mknod", async move { m.make_node(request).await }, move |r| match r {
            Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        });
    }
}

fn open_flags(keep_cache: bool, direct_io: bool) -> FopenFlags {
    let mut flags = FopenFlags::empty();
    if keep_cache {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if direct_io {
        flags |= FopenFlags::FOPEN_DIRECT_IO;
    }
    flags
}

/// getxattr/listxattr: size 0 asks how big the answer is; a smaller buffer gets ERANGE.
fn xattr_reply(r: FsResult<Vec<u8>>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(&e)),
    }
}

fn empty(r: FsResult<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Lists directory handle `fh` from position `offset`, under the operation deadline.
async fn list_dir(
    m: &Mount,
    fh: FileHandle,
    offset: u64,
    add: impl FnMut(u64, u64, FileType, &OsStr, &Attr) -> bool,
) -> FsResult<()> {
    let listing = async {
        let handle = m.dir_handle(fh.0)?;
        let mut h = handle.lock().await;
        fill_dir(m, &mut h, offset, add).await
    };
    let result = match tokio::time::timeout(OP_DEADLINE, listing).await {
        Ok(r) => r,
        Err(_) => Err(FsError::io(format!("readdir did not complete within {OP_DEADLINE:?}"))),
    };
    if let Err(e) = &result
        && !e.is_routine()
    {
        tracing::warn!("readdir failed: {e}");
    }
    result
}

/// Adds entries from position `offset` on until `add` reports the reply buffer full.
async fn fill_dir(
    m: &Mount,
    h: &mut DirHandle,
    offset: u64,
    mut add: impl FnMut(u64, u64, FileType, &OsStr, &Attr) -> bool,
) -> FsResult<()> {
    if offset == 0 || !h.reachable(offset) {
        h.rewind();
    }
    let mut pos = offset;
    let dir = h.dir;
    if pos == 0 {
        if add(0, dir.ino, FileType::Directory, OsStr::new("."), &dir) {
            return Ok(());
        }
        pos = 1;
    }
    if pos == 1 {
        if add(1, dir.ino, FileType::Directory, OsStr::new(".."), &dir) {
            return Ok(());
        }
        pos = FIRST_ENTRY;
    }
    loop {
        while pos >= h.end() && !h.done {
            h.discard_before(pos);
            m.fetch_dir_page(h).await?;
        }
        let Some(e) = h.get(pos) else { return Ok(()) };
        if add(
            pos,
            e.attr.ino,
            file_type(e.attr.kind),
            OsStr::from_bytes(&e.name),
            &e.attr,
        ) {
            return Ok(());
        }
        pos += 1;
    }
}
