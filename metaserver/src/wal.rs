//! The write-ahead log in front of redb.
//!
//! A durable redb commit writes and fsyncs the B-tree pages every change touched; appending
//! the same changes to a log and `fdatasync`ing it costs one small write. So the commit thread
//! makes each batch durable here, commits it to redb without an fsync (readers see it at
//! once), and only now and then makes redb itself durable (a *checkpoint*), after which the
//! log starts again from its beginning.
//!
//! Invariants:
//! - a batch is answered only after its record is in the log and `fdatasync`ed, and a record
//!   is written before its transaction is committed to redb, so nothing a client saw can be
//!   missing from the log after a crash;
//! - redb's durable state holds `keys::WAL_SEQ` (the last batch it contains) and
//!   `keys::WAL_TOKEN` (chosen afresh at every checkpoint); the log's records since that
//!   checkpoint carry the same token and consecutive sequence numbers from `WAL_SEQ + 1`.
//!   On start, exactly those are replayed: records of an earlier round (left further into
//!   the file, or in front of a database restored from a backup) carry another token;
//! - the file is written once with zeros up to [`PREALLOCATED`] bytes, so an append usually
//!   overwrites allocated blocks and its `fdatasync` need not update the file's size.
//!
//! Record format, little-endian: `len: u32`, `crc32c(payload): u32`, `payload` (postcard of
//! [`Record`]). A zero length, a length past the end, a bad checksum, another token or a gap
//! in the sequence ends the log: that is where the last append was cut short (it was never
//! acknowledged).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use redb::{Database, ReadableDatabase, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::error::{MetaError, Result};
use crate::logged::{RawChange, apply_changes};
use crate::schema::*;

/// The log's file name, in the database's directory.
pub const WAL_FILE: &str = "meta.wal";
/// Bytes written as zeros when the log is created, and past which a checkpoint is made.
pub const PREALLOCATED: u64 = 8 << 20;
/// Bytes of a record's header.
const HEADER: usize = 8;
/// A record no append could have made (redb's own limit on one value is 3 GiB; a batch is
/// bounded by the committer's batch size).
const MAX_RECORD: u64 = 1 << 30;

/// Which table a logged change belongs to. The numbers are part of the log's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum TableId {
    Inodes = 1,
    Dirents = 2,
    Chunks = 3,
    Xattrs = 4,
    NodePieces = 5,
    Deletes = 6,
    Orphans = 7,
    Sessions = 8,
    Nodes = 9,
    Meta = 10,
    Commits = 11,
}

/// One batch: everything one transaction changed.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub token: u64,
    pub seq: u64,
    pub tables: Vec<(TableId, Vec<RawChange>)>,
}

/// The open log, positioned after the last record of the current round.
pub struct Wal {
    file: File,
    path: PathBuf,
    /// Where the next record goes.
    pos: u64,
    /// The token of this round's records (durable in redb since the round began).
    token: u64,
    /// The sequence number of the last batch, logged or checkpointed.
    seq: u64,
    /// When the round began (the last checkpoint).
    round_began: Instant,
    /// `pos` and `seq` as of the last fdatasync: records past it are written, not durable.
    synced: (u64, u64),
}

impl Wal {
    /// Opens (creating if missing) the log beside the database, replays into redb what it
    /// holds beyond redb's durable state, and starts a new round. Runs before anything else
    /// reads the database.
    pub fn recover(db: &Database, path: &Path) -> Result<Wal> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| MetaError::Log { path, op, source }
        };
        let (token, durable_seq) = {
            let r = db.begin_read()?;
            let meta = r.open_table(META)?;
            (get_counter(&meta, keys::WAL_TOKEN)?, get_counter(&meta, keys::WAL_SEQ)?)
        };
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io("read"))?;
        let records = parse(&bytes, token, durable_seq).map_err(|reason| MetaError::LogDamaged {
            path: path.to_path_buf(),
            reason,
        })?;
        let mut seq = durable_seq;
        if let Some(last) = records.last() {
            seq = last.seq;
            let txn = db.begin_write()?;
            for record in &records {
                apply_record(&txn, record)?;
            }
            txn.commit()?;
            tracing::info!(
                "replayed {} metadata batches ({}..={seq}) from {}",
                records.len(),
                durable_seq + 1,
                path.display()
            );
        }
        if (bytes.len() as u64) < PREALLOCATED {
            let zeros = vec![0u8; (PREALLOCATED - bytes.len() as u64) as usize];
            file.write_all_at(&zeros, bytes.len() as u64)
                .map_err(io("preallocate"))?;
            file.sync_all().map_err(io("fsync"))?;
        }
        if !existed && let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("fsync the directory of"))?;
        }
        let mut wal = Wal {
            file,
            path: path.to_path_buf(),
            pos: 0,
            token,
            seq,
            round_began: Instant::now(),
            synced: (0, seq),
        };
        wal.checkpoint(db)?;
        Ok(wal)
    }

    /// The sequence number the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.seq + 1
    }

    /// Whether the log holds batches redb has not made durable itself.
    pub fn has_records(&self) -> bool {
        self.pos > 0
    }

    /// Whether the round is long enough to end with a checkpoint.
    pub fn is_full(&self) -> bool {
        self.pos >= PREALLOCATED
    }

    /// How long since the round began.
    pub fn round_age(&self) -> std::time::Duration {
        self.round_began.elapsed()
    }

    /// Appends batch `next_seq()` and makes it durable. On failure nothing counts as logged
    /// (the next append overwrites the same place) and the caller must not commit the batch.
    pub fn append(&mut self, tables: Vec<(TableId, Vec<RawChange>)>) -> Result<()> {
        self.write(tables)?;
        self.sync()
    }

    /// Writes batch `next_seq()` after the records written so far, without making it durable
    /// ([`sync`](Self::sync) does). On failure nothing counts as written and the caller must
    /// not commit the batch.
    pub fn write(&mut self, tables: Vec<(TableId, Vec<RawChange>)>) -> Result<()> {
        let record = Record {
            token: self.token,
            seq: self.next_seq(),
            tables,
        };
        let payload = postcard::to_stdvec(&record).map_err(|source| MetaError::Corrupt {
            what: format!("log record {}", record.seq),
            source,
        })?;
        let mut frame = Vec::with_capacity(HEADER + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        self.file
            .write_all_at(&frame, self.pos)
            .map_err(|source| self.error("append to", source))?;
        self.pos += frame.len() as u64;
        self.seq = record.seq;
        Ok(())
    }

    /// Makes every record written so far durable. On failure none of those written since the
    /// last sync counts as logged (the next write overwrites them).
    pub fn sync(&mut self) -> Result<()> {
        if !self.has_unsynced() {
            return Ok(());
        }
        match self.file.sync_data() {
            Ok(()) => {
                self.synced = (self.pos, self.seq);
                Ok(())
            }
            Err(source) => {
                (self.pos, self.seq) = self.synced;
                Err(self.error("fdatasync", source))
            }
        }
    }

    /// Whether records were written since the last sync.
    pub fn has_unsynced(&self) -> bool {
        (self.pos, self.seq) != self.synced
    }

    fn error(&self, op: &'static str, source: std::io::Error) -> MetaError {
        MetaError::Log {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// Makes redb durable up to the last batch, under a new token, and starts a new round at
    /// the beginning of the file. Records of the old round left in the file no longer count.
    pub fn checkpoint(&mut self, db: &Database) -> Result<()> {
        let token = dfs_common::token::fresh_token(self.token);
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(keys::WAL_TOKEN, token)?;
            meta.insert(keys::WAL_SEQ, self.seq)?;
        }
        txn.commit()?;
        self.token = token;
        self.pos = 0;
        self.synced = (0, self.seq);
        self.round_began = Instant::now();
        Ok(())
    }
}

/// The records of the round `token` that follow `durable_seq`, in order.
fn parse(bytes: &[u8], token: u64, durable_seq: u64) -> Result<Vec<Record>, String> {
    let mut records: Vec<Record> = Vec::new();
    let mut pos = 0usize;
    while let Some(header) = bytes.get(pos..pos + HEADER) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let start = pos + HEADER;
        if len == 0 || len > MAX_RECORD || start as u64 + len > bytes.len() as u64 {
            break;
        }
        let payload = &bytes[start..start + len as usize];
        if crc32c::crc32c(payload) != crc {
            break;
        }
        let Ok(record) = postcard::from_bytes::<Record>(payload) else {
            break;
        };
        if record.token != token {
            break;
        }
        let expected = records.last().map_or(durable_seq + 1, |r| r.seq + 1);
        if record.seq != expected {
            // A checkpoint always records the last batch before a round begins, so the
            // round's first record follows it exactly.
            return Err(format!(
                "record at offset {pos} is batch {}, expected {expected}: the log does not follow the database",
                record.seq
            ));
        }
        records.push(record);
        pos = start + len as usize;
    }
    Ok(records)
}

/// Applies one logged batch in `txn`.
pub fn apply_record(txn: &WriteTransaction, record: &Record) -> Result<()> {
    for (table, changes) in &record.tables {
        match table {
            TableId::Inodes => apply_changes(&mut txn.open_table(INODES)?, changes)?,
            TableId::Dirents => apply_changes(&mut txn.open_table(DIRENTS)?, changes)?,
            TableId::Chunks => apply_changes(&mut txn.open_table(CHUNKS)?, changes)?,
            TableId::Xattrs => apply_changes(&mut txn.open_table(XATTRS)?, changes)?,
            TableId::NodePieces => apply_changes(&mut txn.open_table(NODE_PIECES)?, changes)?,
            TableId::Deletes => apply_changes(&mut txn.open_table(DELETES)?, changes)?,
            TableId::Orphans => apply_changes(&mut txn.open_table(ORPHANS)?, changes)?,
            TableId::Sessions => apply_changes(&mut txn.open_table(SESSIONS)?, changes)?,
            TableId::Nodes => apply_changes(&mut txn.open_table(NODES)?, changes)?,
            TableId::Meta => apply_changes(&mut txn.open_table(META)?, changes)?,
            TableId::Commits => apply_changes(&mut txn.open_table(COMMITS)?, changes)?,
        }
    }
    let mut meta = txn.open_table(META)?;
    meta.insert(keys::WAL_SEQ, record.seq)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::committer::Committer;

    fn counter(db: &Database, key: &str) -> u64 {
        let r = db.begin_read().unwrap();
        get_counter(&r.open_table(META).unwrap(), key).unwrap()
    }

    /// A copy of the files of a live database: what is on disk if the process is killed now.
    fn crash_image(dir: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for name in ["m.redb", WAL_FILE] {
            std::fs::copy(dir.join(name), to.join(name)).unwrap();
        }
    }

    #[tokio::test]
    async fn acknowledged_batches_survive_a_crash_between_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(crate::db::open(&dir.path().join("m.redb"), 1 << 20).unwrap());
        let wal = Wal::recover(&db, &dir.path().join(WAL_FILE)).unwrap();
        let committer = Committer::start(db.clone(), Some(wal), |_| {}, |_| false, Default::default());
        for i in 1..=50u64 {
            committer
                .write(move |ctx| {
                    ctx.meta.insert("test", i)?;
                    ctx.inodes.insert(1000 + i, &b"x"[..])?;
                    if i > 1 {
                        ctx.inodes.remove(1000 + i - 1)?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
        }
        // No checkpoint since (idle ones wait 500 ms): the batches are in the log only.
        let image = dir.path().join("image");
        crash_image(dir.path(), &image);
        let db2 = crate::db::open(&image.join("m.redb"), 1 << 20).unwrap();
        assert!(counter(&db2, "test") < 50, "the crash image should predate the batches");
        let wal2 = Wal::recover(&db2, &image.join(WAL_FILE)).unwrap();
        assert_eq!(counter(&db2, "test"), 50);
        assert_eq!(wal2.seq, counter(&db2, keys::WAL_SEQ));
        let r = db2.begin_read().unwrap();
        let inodes = r.open_table(INODES).unwrap();
        assert!(inodes.get(1050).unwrap().is_some());
        assert!(inodes.get(1049).unwrap().is_none());
        drop((r, inodes));
        // Recovering again replays nothing more (the new round has no records).
        drop(wal2);
        let wal3 = Wal::recover(&db2, &image.join(WAL_FILE)).unwrap();
        assert_eq!(counter(&db2, "test"), 50);
        assert!(!wal3.has_records());
    }

    /// Early answers (a create's) come before their batch is fdatasync'd; the batch is in the
    /// log by then, in order, and a normal batch after it makes both durable: a crash image
    /// taken then replays every one, early or not, in the order they were answered.
    #[tokio::test]
    async fn early_batches_are_logged_in_order_and_made_durable_by_the_next_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(crate::db::open(&dir.path().join("m.redb"), 1 << 20).unwrap());
        let wal = Wal::recover(&db, &dir.path().join(WAL_FILE)).unwrap();
        let committer = Committer::start(db.clone(), Some(wal), |_| {}, |_| false, Default::default());
        for i in 1..=30u64 {
            let op = move |ctx: &mut crate::db::WriteCtx<'_>| {
                ctx.meta.insert("test", i)?;
                ctx.inodes.insert(2000 + i, &b"x"[..])?;
                Ok(())
            };
            if i % 3 == 0 {
                committer.write(op).await.unwrap();
            } else {
                committer.write_early(op).await.unwrap();
                // Answered early, yet already visible to readers.
                assert_eq!(counter(&db, "test"), i);
            }
        }
        // The last batch (30) was a normal one: everything answered is durable in the log.
        let image = dir.path().join("image");
        crash_image(dir.path(), &image);
        let db2 = crate::db::open(&image.join("m.redb"), 1 << 20).unwrap();
        Wal::recover(&db2, &image.join(WAL_FILE)).unwrap();
        assert_eq!(counter(&db2, "test"), 30);
        let r = db2.begin_read().unwrap();
        let inodes = r.open_table(INODES).unwrap();
        for i in 1..=30u64 {
            assert!(inodes.get(2000 + i).unwrap().is_some(), "batch {i} lost");
        }
    }

    fn record(token: u64, seq: u64) -> Vec<u8> {
        let payload = postcard::to_stdvec(&Record {
            token,
            seq,
            tables: vec![(TableId::Meta, vec![(b"k".to_vec(), Some(seq.to_le_bytes().to_vec()))])],
        })
        .unwrap();
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        frame
    }

    #[test]
    fn the_log_ends_at_a_torn_record_another_round_or_zeros() {
        let mut bytes = [record(7, 11), record(7, 12), record(7, 13)].concat();
        let whole = bytes.len();
        bytes.extend_from_slice(&[0u8; 64]);
        assert_eq!(parse(&bytes, 7, 10).unwrap().len(), 3);
        // Already in the database: nothing of an older round counts.
        assert_eq!(parse(&bytes, 8, 13).unwrap().len(), 0);
        // The last append cut short.
        assert_eq!(parse(&bytes[..whole - 3], 7, 10).unwrap().len(), 2);
        let mut flipped = bytes.clone();
        flipped[whole - 5] ^= 1;
        assert_eq!(parse(&flipped, 7, 10).unwrap().len(), 2);
        // Records of a new round written over an older, longer one.
        let mut reused = [record(9, 14)].concat();
        reused.extend_from_slice(&bytes[reused.len()..]);
        assert_eq!(parse(&reused, 9, 13).unwrap().len(), 1);
        // A gap means the log belongs to another state of the database.
        assert!(parse(&bytes, 7, 9).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x = 0x9e3779b97f4a7c15u64;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse(&bytes, 0, 0);
        }
    }
}
