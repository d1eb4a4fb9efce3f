//! Online backups: a consistent copy of the whole database, taken from one read transaction
//! (redb snapshots are isolated from later commits), written to a new database file, then
//! handed to the client in pieces (`BackupRead`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dfs_proto::ErrorKind;
use dfs_proto::meta::{BACKUP_READ, Backup, BackupRead, BackupSnapshot};
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::error::{MetaError, Result};
use crate::schema::*;
use crate::service::{MetaService, lock};

/// A snapshot not read to its end within this long is deleted.
pub const SNAPSHOT_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub struct Snapshot {
    pub path: PathBuf,
    pub len: u64,
    pub created: Instant,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> MetaError {
    MetaError::fs(ErrorKind::Io, format!("backup: {what} {}: {e}", path.display()))
}

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &ReadTransaction,
    to: &WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<u64> {
    let source = from.open_table(def)?;
    let mut target = to.open_table(def)?;
    let mut n = 0;
    for item in source.iter()? {
        let (k, v) = item?;
        target.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(n)
}

/// Writes every table as of one snapshot of `db` into a new database at `path`.
pub fn write_snapshot(db: &Database, path: &Path) -> Result<u64> {
    let snapshot = db.begin_read()?;
    let copy = Database::create(path)?;
    let txn = copy.begin_write()?;
    let mut records = 0;
    records += copy_table(&snapshot, &txn, INODES)?;
    records += copy_table(&snapshot, &txn, DIRENTS)?;
    records += copy_table(&snapshot, &txn, CHUNKS)?;
    records += copy_table(&snapshot, &txn, NODE_PIECES)?;
    records += copy_table(&snapshot, &txn, DELETES)?;
    records += copy_table(&snapshot, &txn, ORPHANS)?;
    records += copy_table(&snapshot, &txn, XATTRS)?;
    records += copy_table(&snapshot, &txn, SESSIONS)?;
    records += copy_table(&snapshot, &txn, NODES)?;
    records += copy_table(&snapshot, &txn, COMMITS)?;
    records += copy_table(&snapshot, &txn, META)?;
    txn.commit()?;
    Ok(records)
}

/// Where snapshots wait to be read by `dfs-metaserver backup`.
pub fn snapshots_dir(db_dir: &std::path::Path) -> std::path::PathBuf {
    db_dir.join("backups")
}

/// Removes snapshots a previous run of the metaserver left (a backup interrupted by a crash
/// or restart: nobody can read them any more); returns how many.
pub fn remove_leftover_snapshots(db_dir: &std::path::Path) -> usize {
    let dir = snapshots_dir(db_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("snapshot-") && name.ends_with(".redb") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => tracing::warn!("cannot remove leftover backup snapshot {}: {err}", e.path().display()),
            }
        }
    }
    removed
}

impl MetaService {
    pub async fn backup(&self, _req: Backup) -> Result<BackupSnapshot> {
        let dir = snapshots_dir(&self.db_dir);
        let id = rand_id();
        let path = dir.join(format!("snapshot-{id}.redb"));
        let db = self.db.clone();
        let target = path.clone();
        let (records, len) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
            let records = write_snapshot(&db, &target)?;
            let len = std::fs::metadata(&target).map_err(|e| io("stat", &target, e))?.len();
            Ok::<_, MetaError>((records, len))
        })
        .await
        .map_err(|e| MetaError::CommitFailed(format!("backup task failed: {e}")))??;
        tracing::info!(
            "backup snapshot {} taken: {records} records, {len} bytes",
            path.display()
        );
        lock(&self.backups).insert(
            id,
            Snapshot {
                path,
                len,
                created: Instant::now(),
            },
        );
        Ok(BackupSnapshot { id, len })
    }

    pub async fn backup_read(&self, req: BackupRead) -> Result<Vec<u8>> {
        let (path, len) = match lock(&self.backups).get(&req.id) {
            Some(s) => (s.path.clone(), s.len),
            None => {
                return Err(MetaError::fs(
                    ErrorKind::NotFound,
                    format!("backup snapshot {} (expired or finished)", req.id),
                ));
            }
        };
        let offset = req.offset.min(len);
        let n = (len - offset).min(BACKUP_READ as u64) as usize;
        let p = path.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(&p).map_err(|e| io("open", &p, e))?;
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, offset).map_err(|e| io("read", &p, e))?;
            Ok::<_, MetaError>(buf)
        })
        .await
        .map_err(|e| MetaError::CommitFailed(format!("backup task failed: {e}")))??;
        if offset + n as u64 >= len {
            self.forget_snapshot(req.id);
        }
        Ok(bytes)
    }

    fn forget_snapshot(&self, id: u64) {
        if let Some(s) = lock(&self.backups).remove(&id)
            && let Err(e) = std::fs::remove_file(&s.path)
        {
            tracing::warn!("cannot remove backup snapshot {}: {e}", s.path.display());
        }
    }

    /// Deletes snapshots abandoned by their client.
    pub(crate) fn expire_snapshots(&self, now: Instant) {
        let old: Vec<u64> = lock(&self.backups)
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.created) > SNAPSHOT_LIFETIME)
            .map(|(&id, _)| id)
            .collect();
        for id in old {
            self.forget_snapshot(id);
        }
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_left_by_a_previous_run_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = snapshots_dir(dir.path());
        std::fs::create_dir_all(&snapshots).unwrap();
        std::fs::write(snapshots.join("snapshot-42.redb"), b"half a backup").unwrap();
        std::fs::write(snapshots.join("keep.txt"), b"not ours").unwrap();
        let db = crate::db::open(&dir.path().join("meta.redb"), 1 << 20).unwrap();
        let _svc = MetaService::start(
            std::sync::Arc::new(db),
            dir.path().to_owned(),
            crate::service_tests::settings(),
        )
        .unwrap();
        assert!(!snapshots.join("snapshot-42.redb").exists());
        assert!(snapshots.join("keep.txt").exists());
    }

    #[test]
    fn a_snapshot_is_a_working_database_with_the_same_records() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(&dir.path().join("meta.redb"), 1 << 20).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut ctx = crate::db::WriteCtx::open(&txn).unwrap();
            crate::namespace::make_node(
                &mut ctx,
                &crate::namespace::NewNode {
                    parent: dfs_proto::types::ROOT_INO,
                    name: b"kept",
                    kind: dfs_proto::types::FileKind::Directory,
                    perm: 0o755,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: &[],
                },
            )
            .unwrap();
        }
        txn.commit().unwrap();
        let copy_path = dir.path().join("copy.redb");
        assert!(write_snapshot(&db, &copy_path).unwrap() > 3);
        drop(db);
        let copy = crate::db::open(&copy_path, 1 << 20).unwrap();
        let r = crate::db::ReadCtx::begin(&copy).unwrap();
        assert!(crate::namespace::lookup(&r, dfs_proto::types::ROOT_INO, b"kept").is_ok());
    }
}
