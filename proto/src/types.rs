//! Plain data shared by every component: identifiers, timestamps, attributes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Inode number. Allocated by the metaserver, never reused.
pub type Ino = u64;
/// Identity of one stored piece of file data. Allocated by the metaserver, never reused:
/// a rewrite of a chunk produces a new piece, so a piece id also names a version.
pub type PieceId = u64;
/// Storage daemon identity, assigned by the metaserver at first registration.
pub type NodeId = u32;
/// A mount's session with the metaserver (tracks its open files).
pub type SessionId = u64;
/// A mount's id for one open of a file, unique within its session (its FUSE file handle).
pub type HandleId = u64;

/// The root directory's inode number (as FUSE expects).
pub const ROOT_INO: Ino = 1;

/// Wall-clock time with nanoseconds, as stored in inodes.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        SystemTime::now().into()
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                // Before 1970: represent as negative seconds with positive nanos.
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nanos = d.subsec_nanos();
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Timestamp { secs, nanos }
            }
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        if t.secs >= 0 {
            UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(t.nanos as u64)
        }
    }
}

/// What an inode is.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    RegularFile,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// An inode's attributes as the metaserver reports them.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (mode & 0o7777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub rdev: u32,
    /// Bytes actually stored for this file (holes excluded), for st_blocks.
    pub stored_bytes: u64,
    /// Whether the inode has extended attributes: lets a mount answer "none" without asking
    /// (`ls -l` asks for `security.selinux` of every file).
    pub has_xattrs: bool,
    /// For a directory: moves by one with every change of its entries (create, link, unlink,
    /// rename in, out or within), so a mount that sees it one past the version it knew knows
    /// its own change was the only one. 0 for other kinds.
    pub dir_version: u64,
}

/// Where a storage daemon can be reached, and whether the metaserver believes it is alive.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    pub id: NodeId,
    /// The name in the daemon's certificate; clients verify it when they connect.
    pub name: String,
    /// `host:port` of the daemon's QUIC endpoint.
    pub addr: String,
    pub up: bool,
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.addr)
    }
}

/// A storage daemon's own account of its disk, sent with every heartbeat.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeUsage {
    /// Pieces stored.
    pub pieces: u64,
    /// Bytes of piece data stored.
    pub bytes: u64,
    /// Bytes still available for new pieces.
    pub free_bytes: u64,
    /// Total capacity (used + free) the daemon offers.
    pub capacity_bytes: u64,
}
