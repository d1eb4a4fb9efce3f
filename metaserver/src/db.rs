//! Opening the database and the table sets that operations work on.

use std::path::Path;

use dfs_proto::meta::Changes;
use dfs_proto::types::{Attr, FileKind, NodeId, PieceId, ROOT_INO, Timestamp};
use redb::{Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};

use crate::error::{MetaError, Result};
use crate::logged::{Logged, RawChange};
use crate::schema::*;
use crate::wal::TableId;

/// Opens (creating and initialising if new) the metadata database.
pub fn open(path: &Path, chunk_size: u64) -> Result<Database> {
    let db = Database::create(path)?;
    let txn = db.begin_write()?;
    {
        let mut ctx = WriteCtx::open(&txn)?;
        let format = ctx.meta.get(keys::FORMAT)?.map(|v| v.value());
        match format {
            None => {
                let now = Timestamp::now();
                let mut root = InodeRecord::new(FileKind::Directory, 0o755, 0, 0, now);
                root.parent = ROOT_INO;
                ctx.put_inode(ROOT_INO, &root)?;
                ctx.meta.insert(keys::FORMAT, FORMAT_VERSION)?;
                ctx.meta.insert(keys::NEXT_INO, ROOT_INO + 1)?;
                ctx.meta.insert(keys::PIECE_ID_LIMIT, 1)?;
                ctx.meta.insert(keys::CHUNK_SIZE, chunk_size)?;
                ctx.meta.insert(keys::DIRECTORIES, 1)?;
            }
            Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(MetaError::fs(
                    dfs_proto::ErrorKind::Unsupported,
                    format!(
                        "database {} has format {v}; this metaserver reads format {FORMAT_VERSION}",
                        path.display()
                    ),
                ));
            }
        }
    }
    txn.commit()?;
    Ok(db)
}

/// Read access to the tables queries need, from either kind of transaction.
pub trait Tables {
    fn inodes(&self) -> &impl ReadableTable<u64, &'static [u8]>;
    fn dirents(&self) -> &impl ReadableTable<(u64, &'static [u8]), u64>;
    fn chunks(&self) -> &impl ReadableTable<(u64, u64), &'static [u8]>;
    fn xattrs(&self) -> &impl ReadableTable<(u64, &'static [u8]), &'static [u8]>;
}

/// What a committed write means for the in-memory view (registry, reaper).
#[derive(Debug, Default)]
pub struct Effects {
    /// (node, piece, length) now referenced.
    pub pieces_added: Vec<(NodeId, PieceId, u64)>,
    /// (node, piece, length) no longer referenced (queued for deletion).
    pub pieces_removed: Vec<(NodeId, PieceId, u64)>,
    /// An inode lost its last link: the reaper should look.
    pub orphaned: bool,
}

/// Every table, open for writing within one transaction.
pub struct WriteCtx<'t> {
    pub inodes: Logged<'t, u64, &'static [u8]>,
    pub dirents: Logged<'t, (u64, &'static [u8]), u64>,
    pub chunks: Logged<'t, (u64, u64), &'static [u8]>,
    pub xattrs: Logged<'t, (u64, &'static [u8]), &'static [u8]>,
    pub node_pieces: Logged<'t, (u32, u64), (u64, u64, u64)>,
    pub deletes: Logged<'t, (u32, u64), ()>,
    pub orphans: Logged<'t, u64, ()>,
    pub sessions: Logged<'t, u64, ()>,
    pub nodes: Logged<'t, u32, &'static [u8]>,
    pub meta: Logged<'t, &'static str, u64>,
    pub commits: Logged<'t, (u64, u64), &'static [u8]>,
    pub effects: Effects,
    pub now: Timestamp,
    /// Whether an inode that just lost its last link may go at once (no mount has it open).
    pub may_delete: &'t (dyn Fn(u64) -> bool + Sync),
    /// Every inode written (its new attributes) or removed (None), in order.
    pub touched: Vec<(u64, Option<Attr>)>,
}

/// Without knowledge of open files, every unlinked inode waits as an orphan.
static KEEP_ORPHANS: fn(u64) -> bool = |_| false;

impl<'t> WriteCtx<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Self::open_with(txn, &KEEP_ORPHANS)
    }

    pub fn open_with(txn: &'t WriteTransaction, may_delete: &'t (dyn Fn(u64) -> bool + Sync)) -> Result<Self> {
        Ok(WriteCtx {
            inodes: Logged::new(txn.open_table(INODES)?),
            dirents: Logged::new(txn.open_table(DIRENTS)?),
            chunks: Logged::new(txn.open_table(CHUNKS)?),
            xattrs: Logged::new(txn.open_table(XATTRS)?),
            node_pieces: Logged::new(txn.open_table(NODE_PIECES)?),
            deletes: Logged::new(txn.open_table(DELETES)?),
            orphans: Logged::new(txn.open_table(ORPHANS)?),
            sessions: Logged::new(txn.open_table(SESSIONS)?),
            nodes: Logged::new(txn.open_table(NODES)?),
            meta: Logged::new(txn.open_table(META)?),
            commits: Logged::new(txn.open_table(COMMITS)?),
            effects: Effects::default(),
            now: Timestamp::now(),
            may_delete,
            touched: Vec::new(),
        })
    }

    pub fn put_inode(&mut self, ino: u64, rec: &InodeRecord) -> Result<()> {
        self.inodes.insert(ino, rec.encode().as_slice())?;
        self.touched.push((ino, Some(rec.attr(ino))));
        Ok(())
    }

    /// Removes an inode and its extended attributes.
    pub fn remove_inode(&mut self, ino: u64) -> Result<()> {
        self.inodes.remove(ino)?;
        self.xattrs
            .retain_in((ino, &[][..])..(ino + 1, &[][..]), |_, _| false)?;
        self.touched.push((ino, None));
        Ok(())
    }

    /// What was touched since `mark` (a length of `touched`), the last state of each inode.
    pub fn changes_since(&self, mark: usize) -> Changes {
        let mut last: Vec<(u64, Option<Attr>)> = Vec::new();
        for (ino, attr) in &self.touched[mark.min(self.touched.len())..] {
            match last.iter_mut().find(|(i, _)| i == ino) {
                Some(entry) => entry.1 = *attr,
                None => last.push((*ino, *attr)),
            }
        }
        let mut changes = Changes::default();
        for (ino, attr) in last {
            match attr {
                Some(a) => changes.changed.push(a),
                None => changes.removed.push(ino),
            }
        }
        changes
    }

    /// Every change made in this transaction so far, by table (see [`crate::wal::TableId`]).
    pub fn take_changes(&mut self) -> Vec<(TableId, Vec<RawChange>)> {
        let all = [
            (TableId::Inodes, self.inodes.take_changes()),
            (TableId::Dirents, self.dirents.take_changes()),
            (TableId::Chunks, self.chunks.take_changes()),
            (TableId::Xattrs, self.xattrs.take_changes()),
            (TableId::NodePieces, self.node_pieces.take_changes()),
            (TableId::Deletes, self.deletes.take_changes()),
            (TableId::Orphans, self.orphans.take_changes()),
            (TableId::Sessions, self.sessions.take_changes()),
            (TableId::Nodes, self.nodes.take_changes()),
            (TableId::Meta, self.meta.take_changes()),
            (TableId::Commits, self.commits.take_changes()),
        ];
        all.into_iter().filter(|(_, changes)| !changes.is_empty()).collect()
    }

    pub fn add_counter(&mut self, key: &'static str, delta: i64) -> Result<()> {
        let v = get_counter(self.meta.table(), key)?;
        self.meta.insert(key, v.saturating_add_signed(delta))?;
        Ok(())
    }
}

impl Tables for WriteCtx<'_> {
    fn inodes(&self) -> &impl ReadableTable<u64, &'static [u8]> {
        self.inodes.table()
    }
    fn dirents(&self) -> &impl ReadableTable<(u64, &'static [u8]), u64> {
        self.dirents.table()
    }
    fn chunks(&self) -> &impl ReadableTable<(u64, u64), &'static [u8]> {
        self.chunks.table()
    }
    fn xattrs(&self) -> &impl ReadableTable<(u64, &'static [u8]), &'static [u8]> {
        self.xattrs.table()
    }
}

/// A consistent snapshot for queries.
pub struct ReadCtx {
    pub inodes: ReadOnlyTable<u64, &'static [u8]>,
    pub dirents: ReadOnlyTable<(u64, &'static [u8]), u64>,
    pub chunks: ReadOnlyTable<(u64, u64), &'static [u8]>,
    pub xattrs: ReadOnlyTable<(u64, &'static [u8]), &'static [u8]>,
    pub node_pieces: ReadOnlyTable<(u32, u64), (u64, u64, u64)>,
    pub deletes: ReadOnlyTable<(u32, u64), ()>,
    pub orphans: ReadOnlyTable<u64, ()>,
    pub sessions: ReadOnlyTable<u64, ()>,
    pub nodes: ReadOnlyTable<u32, &'static [u8]>,
    pub meta: ReadOnlyTable<&'static str, u64>,
    pub commits: ReadOnlyTable<(u64, u64), &'static [u8]>,
}

impl ReadCtx {
    pub fn open(txn: &ReadTransaction) -> Result<Self> {
        Ok(ReadCtx {
            inodes: txn.open_table(INODES)?,
            dirents: txn.open_table(DIRENTS)?,
            chunks: txn.open_table(CHUNKS)?,
            xattrs: txn.open_table(XATTRS)?,
            node_pieces: txn.open_table(NODE_PIECES)?,
            deletes: txn.open_table(DELETES)?,
            orphans: txn.open_table(ORPHANS)?,
            sessions: txn.open_table(SESSIONS)?,
            nodes: txn.open_table(NODES)?,
            meta: txn.open_table(META)?,
            commits: txn.open_table(COMMITS)?,
        })
    }

    pub fn begin(db: &Database) -> Result<Self> {
        ReadCtx::open(&db.begin_read()?)
    }
}

impl Tables for ReadCtx {
    fn inodes(&self) -> &impl ReadableTable<u64, &'static [u8]> {
        &self.inodes
    }
    fn dirents(&self) -> &impl ReadableTable<(u64, &'static [u8]), u64> {
        &self.dirents
    }
    fn chunks(&self) -> &impl ReadableTable<(u64, u64), &'static [u8]> {
        &self.chunks
    }
    fn xattrs(&self) -> &impl ReadableTable<(u64, &'static [u8]), &'static [u8]> {
        &self.xattrs
    }
}
