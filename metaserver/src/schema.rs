//! The persistent state: redb tables and the records stored in them.
//!
//! Invariants kept by every write transaction (see `namespace`):
//! - every `DIRENTS` entry points at an existing inode; a directory's `nlink` is 2 plus its
//!   subdirectories, a file's `nlink` is the number of entries naming it;
//! - an inode with `nlink == 0` that still exists is listed in `ORPHANS` (open somewhere);
//! - `CHUNKS` and `NODE_PIECES` describe the same copies (one indexed by file, one by daemon):
//!   a chunk's piece is listed in `NODE_PIECES` under every daemon in its replica list;
//! - a copy leaving `CHUNKS` (the piece replaced, or one replica dropped) enters `DELETES` in the
//!   same transaction, so no piece is leaked and a daemon returning from the dead is told what
//!   it no longer needs;
//! - a piece id names one immutable version of a chunk: a daemon holding an older piece of a
//!   chunk holds a different id, which nothing references, so a stale copy is never served.

use dfs_proto::types::{Attr, FileKind, Ino, NodeId, PieceId, Timestamp};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{MetaError, Result};

/// ino -> postcard(StoredInode)
pub const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
/// (parent ino, name) -> child ino. Name order is readdir order.
pub const DIRENTS: TableDefinition<(u64, &[u8]), u64> = TableDefinition::new("dirents");
/// (ino, chunk index) -> postcard(ChunkRecord): the piece and the daemons holding its copies.
pub const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
/// (node, piece) -> (ino, chunk index, length): what each daemon should hold.
pub const NODE_PIECES: TableDefinition<(u32, u64), (u64, u64, u64)> = TableDefinition::new("node_pieces");
/// (node, piece) pieces that daemon must delete.
pub const DELETES: TableDefinition<(u32, u64), ()> = TableDefinition::new("deletes");
/// Inodes with no links left, kept while some mount still has them open.
pub const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
/// (ino, attribute name) -> value: extended attributes.
pub const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
/// Live mount sessions (awaited after a restart before anything unlinked is deleted).
pub const SESSIONS: TableDefinition<u64, ()> = TableDefinition::new("sessions");
/// (mount's commit client id, sequence number) -> postcard((unix secs, Attr)): the answer
/// of each recent commit, so that a retried one is answered, not applied again.
pub const COMMITS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("commits");
/// node id -> postcard(NodeRecord)
pub const NODES: TableDefinition<u32, &[u8]> = TableDefinition::new("nodes");
/// Named counters and settings.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub mod keys {
    pub const FORMAT: &str = "format_version";
    pub const NEXT_INO: &str = "next_ino";
    pub const PIECE_ID_LIMIT: &str = "piece_id_limit";
    pub const CHUNK_SIZE: &str = "chunk_size";
    pub const FILES: &str = "files";
    pub const DIRECTORIES: &str = "directories";
    pub const SYMLINKS: &str = "symlinks";
    /// The id the next new storage daemon gets (ids are never reused).
    pub const NEXT_NODE_ID: &str = "next_node_id";
    /// The last batch of the write-ahead log this database holds (see `wal`).
    pub const WAL_SEQ: &str = "wal_seq";
    /// The current round of the write-ahead log: only its records are replayed.
    pub const WAL_TOKEN: &str = "wal_token";
}

pub const FORMAT_VERSION: u64 = 2;

/// An inode as stored. Wrapped in a versioned enum so the format can evolve.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct InodeRecord {
    pub kind: FileKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// For files, the size. For directories (which report 4096), the version of its entries
    /// ([`Attr::dir_version`]), bumped by `namespace::touch_dir`.
    pub size: u64,
    pub nlink: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub rdev: u32,
    /// Sum of the valid lengths of the file's pieces.
    pub stored_bytes: u64,
    /// For directories: the parent directory (root: itself).
    pub parent: Ino,
    /// For symlinks: the target.
    pub target: Vec<u8>,
    /// Whether `XATTRS` holds anything for this inode.
    pub has_xattrs: bool,
}

#[derive(Serialize, Deserialize)]
enum StoredInode {
    V1(InodeRecord),
}

impl InodeRecord {
    pub fn new(kind: FileKind, perm: u32, uid: u32, gid: u32, now: Timestamp) -> Self {
        InodeRecord {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            size: 0,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            atime: now,
            mtime: now,
            ctime: now,
            rdev: 0,
            stored_bytes: 0,
            parent: 0,
            target: Vec::new(),
            has_xattrs: false,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == FileKind::Directory
    }

    pub fn attr(&self, ino: Ino) -> Attr {
        Attr {
            ino,
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            size: if self.is_dir() { 4096 } else { self.size },
            nlink: self.nlink,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            rdev: self.rdev,
            stored_bytes: if self.is_dir() { 4096 } else { self.stored_bytes },
            has_xattrs: self.has_xattrs,
            dir_version: if self.is_dir() { self.size } else { 0 },
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(&StoredInode::V1(self.clone())).expect("inode serializes")
    }

    pub fn decode(ino: Ino, bytes: &[u8]) -> Result<Self> {
        match postcard::from_bytes(bytes) {
            Ok(StoredInode::V1(r)) => Ok(r),
            Err(source) => Err(MetaError::Corrupt {
                what: format!("inode {ino}"),
                source,
            }),
        }
    }
}

/// A registered storage daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub addr: String,
    pub domain: Option<String>,
    /// `dfs drain` asked for this daemon to be emptied.
    pub draining: bool,
}

#[derive(Serialize, Deserialize)]
enum StoredNode {
    V1(NodeRecord),
}

impl NodeRecord {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(&StoredNode::V1(self.clone())).expect("node serializes")
    }

    pub fn decode(id: NodeId, bytes: &[u8]) -> Result<Self> {
        match postcard::from_bytes(bytes) {
            Ok(StoredNode::V1(r)) => Ok(r),
            Err(source) => Err(MetaError::Corrupt {
                what: format!("node {id}"),
                source,
            }),
        }
    }
}

/// Where one chunk of a file is stored: one piece, copied on `nodes`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChunkRecord {
    pub piece: PieceId,
    pub len: u64,
    /// Daemons holding a durable copy (distinct). Never empty while the chunk exists.
    pub nodes: Vec<NodeId>,
}

impl ChunkRecord {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("chunk serializes")
    }

    pub fn decode(ino: Ino, chunk: u64, bytes: &[u8]) -> Result<Self> {
        postcard::from_bytes(bytes).map_err(|source| MetaError::Corrupt {
            what: format!("chunk {chunk} of inode {ino}"),
            source,
        })
    }
}

pub fn get_inode(table: &impl ReadableTable<u64, &'static [u8]>, ino: Ino) -> Result<Option<InodeRecord>> {
    match table.get(ino)? {
        Some(v) => Ok(Some(InodeRecord::decode(ino, v.value())?)),
        None => Ok(None),
    }
}

pub fn get_counter(table: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64> {
    Ok(table.get(key)?.map(|v| v.value()).unwrap_or(0))
}
