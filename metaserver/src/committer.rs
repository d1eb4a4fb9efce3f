//! Group commit: one thread owns writing. Operations queue up while a commit is being made
//! durable; the next transaction applies all of them and pays for one fsync. An operation is
//! answered only after the transaction holding it is durable: its record fsync'd in the
//! write-ahead log (`wal`), or, without a log, redb's own durable commit.
//!
//! The exception is an *early* operation ([`Committer::write_early`]: a file's create), the
//! metaserver's counterpart of CephFS's "unsafe reply": with a log, a batch holding one is
//! written to the log, committed to redb (readers see it) and the early operations answered,
//! and only then is the log fdatasync'd and the rest answered. A batch of early operations
//! alone is not fdatasync'd at once: the next batch's fdatasync covers it (a create is
//! followed within a millisecond by its file's `CommitWrite`), or a timer after
//! `EARLY_SYNC_DELAY`: one device flush per small file instead of two. Its client must not report it
//! durable until a later operation on the same inode was answered normally (the mount's
//! close does that: `SyncCreates`, or the data's `CommitWrite`): the log is sequential, so
//! that later batch's fdatasync covers it. An early operation a crash loses takes its inode
//! number with it; the numbers are never given out again (`skip_unlogged_inode_numbers`), so
//! the mount's later requests about it fail with ENOENT instead of reaching another file.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use redb::{Database, Durability};
use tokio::sync::oneshot;

use crate::db::{Effects, WriteCtx};
use crate::error::{MetaError, Result};
use crate::metrics::CommitMetrics;
use crate::schema::keys;
use crate::wal::Wal;

type Responder = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn for<'t> FnOnce(&mut WriteCtx<'t>) -> Responder + Send>;

/// A queued operation, and whether it may be answered before its batch is durable.
struct Queued {
    job: Job,
    early: bool,
}

/// Most operations in one transaction.
const MAX_BATCH: usize = 1024;
/// A batch of early-answered operations alone waits this long at most for its fdatasync, in
/// case a batch that needs one anyway comes (the file's `CommitWrite`, a millisecond later).
const EARLY_SYNC_DELAY: Duration = Duration::from_millis(10);
/// Most early-answered operations left unsynced at once.
const MAX_UNSYNCED_EARLY: usize = MAX_BATCH;
/// Inode numbers skipped at every start: more than the early creates a crash can lose (at
/// most [`MAX_UNSYNCED_EARLY`], plus one batch of them).
pub const UNLOGGED_INODE_NUMBERS: u64 = 1 << 16;
const _: () = assert!((MAX_UNSYNCED_EARLY + MAX_BATCH) as u64 <= UNLOGGED_INODE_NUMBERS);

/// Makes sure no inode number an early-answered create may have given out before a crash lost
/// it is given out again: the mount that was told it may still send requests about it.
pub fn skip_unlogged_inode_numbers(db: &Database) -> Result<()> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(crate::schema::META)?;
        let next = crate::schema::get_counter(&meta, keys::NEXT_INO)?;
        meta.insert(keys::NEXT_INO, next + UNLOGGED_INODE_NUMBERS)?;
    }
    txn.commit()?;
    Ok(())
}
/// With nothing to do for this long, the log's batches are checkpointed into redb.
const IDLE_CHECKPOINT: Duration = Duration::from_millis(500);
/// Under steady load, a checkpoint at least this often (bounds the replay after a crash).
const MAX_ROUND: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Committer {
    jobs: Sender<Queued>,
}

impl Committer {
    /// Starts the commit thread. `on_commit` runs after every transaction, with its effects if
    /// it is durable (None if it failed), before any of its operations is answered;
    /// `may_delete` says whether an inode losing its last link can be deleted at once.
    pub fn start(
        db: Arc<Database>,
        wal: Option<Wal>,
        on_commit: impl Fn(Option<Effects>) + Send + 'static,
        may_delete: impl Fn(u64) -> bool + Send + Sync + 'static,
        metrics: CommitMetrics,
    ) -> Self {
        let (jobs, rx) = channel::<Queued>();
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| commit_loop(&db, wal, rx, &on_commit, &may_delete, &metrics));
                if std::panic::catch_unwind(run).is_err() {
                    // State on disk is consistent; a restart is safer than limping on read-only.
                    tracing::error!("commit thread panicked; aborting so the metaserver restarts");
                    std::process::abort();
                }
            })
            .expect("spawn committer thread");
        Committer { jobs }
    }

    /// Runs `op` in the next transaction and returns its result once that is durable.
    pub async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut WriteCtx<'t>) -> Result<T> + Send + 'static,
    {
        self.queue(op, false).await
    }

    /// Runs `op` in the next transaction and returns its result once that is visible, before
    /// it is durable when there is a log (see the module's documentation for what the caller
    /// then owes its client).
    pub async fn write_early<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut WriteCtx<'t>) -> Result<T> + Send + 'static,
    {
        self.queue(op, true).await
    }

    async fn queue<T, F>(&self, op: F, early: bool) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut WriteCtx<'t>) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx| {
            let result = op(ctx);
            Box::new(move |committed: Result<(), String>| {
                let _ = tx.send(match committed {
                    Ok(()) => result,
                    Err(e) => Err(MetaError::CommitFailed(e)),
                });
            })
        });
        self.jobs
            .send(Queued { job, early })
            .map_err(|_| MetaError::ShuttingDown)?;
        rx.await
            .map_err(|_| MetaError::CommitFailed("the metadata transaction could not start".into()))?
    }
}

fn commit_loop(
    db: &Database,
    mut wal: Option<Wal>,
    rx: Receiver<Queued>,
    on_commit: &dyn Fn(Option<Effects>),
    may_delete: &(dyn Fn(u64) -> bool + Sync),
    metrics: &CommitMetrics,
) {
    // Early-answered operations in the log but not yet fdatasync'd, and when they must be.
    let mut unsynced_early = 0usize;
    let mut sync_by = Instant::now();
    loop {
        let wait = if unsynced_early > 0 {
            Some(sync_by.saturating_duration_since(Instant::now()))
        } else if wal.as_ref().is_some_and(|w| w.has_records()) {
            Some(IDLE_CHECKPOINT)
        } else {
            None
        };
        let first = match wait {
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) if unsynced_early > 0 => {
                    sync_early(&mut wal);
                    unsynced_early = 0;
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    checkpoint(db, &mut wal, metrics);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        metrics.batch_ops.observe(batch.len() as f64);
        let started = Instant::now();
        let (responders, outcome, unsynced) = run_batch(db, &mut wal, batch, may_delete, unsynced_early);
        metrics.duration.observe(started.elapsed().as_secs_f64());
        if unsynced_early == 0 && unsynced > 0 {
            sync_by = Instant::now() + EARLY_SYNC_DELAY;
        }
        unsynced_early = unsynced;
        let (result, effects) = match outcome {
            Ok(effects) => (Ok(()), Some(effects)),
            Err(e) => {
                metrics.failures.inc();
                tracing::error!("metadata transaction failed: {e}");
                (Err(e.to_string()), None)
            }
        };
        on_commit(effects);
        for respond in responders {
            respond(result.clone());
        }
        if wal.as_ref().is_some_and(|w| w.is_full() || w.round_age() >= MAX_ROUND) {
            sync_early(&mut wal);
            unsynced_early = 0;
            checkpoint(db, &mut wal, metrics);
        }
    }
    sync_early(&mut wal);
    if wal.as_ref().is_some_and(|w| w.has_records()) {
        checkpoint(db, &mut wal, metrics);
    }
}

/// Makes the early-answered batches durable. Their answers are out and redb shows them, so a
/// failure can neither be reported nor undone: a restart finds whatever of them reached the
/// disk, and the mounts find out about creates that did not at their close.
fn sync_early(wal: &mut Option<Wal>) {
    if let Some(w) = wal.as_mut()
        && let Err(e) = w.sync()
    {
        tracing::error!("{e}; aborting so a restart replays what the log holds");
        std::process::abort();
    }
}

/// Makes redb durable and starts the log again. If that fails the log keeps its records (they
/// are still needed) and grows; the next checkpoint tries again.
fn checkpoint(db: &Database, wal: &mut Option<Wal>, metrics: &CommitMetrics) {
    let Some(w) = wal.as_mut() else { return };
    let started = std::time::Instant::now();
    match w.checkpoint(db) {
        Ok(()) => metrics.checkpoint_duration.observe(started.elapsed().as_secs_f64()),
        Err(e) => tracing::error!("cannot checkpoint the metadata log into the database: {e}"),
    }
}

/// Applies a batch in one transaction. Jobs of a batch whose transaction cannot even start are
/// dropped, which their callers see as a failed commit. Early jobs are answered here, once the
/// batch is visible, if it is logged; the others are returned, to be answered by the caller.
/// Also returns how many early-answered operations are left in the log unsynced (this batch's
/// and the `unsynced_early` before it): a batch of early jobs alone is not fdatasync'd at once,
/// the next batch that needs it (the file's `CommitWrite`, usually) makes it durable too.
fn run_batch(
    db: &Database,
    wal: &mut Option<Wal>,
    batch: Vec<Queued>,
    may_delete: &(dyn Fn(u64) -> bool + Sync),
    unsynced_early: usize,
) -> (Vec<Responder>, Result<Effects>, usize) {
    let mut txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => return (Vec::new(), Err(e.into()), unsynced_early),
    };
    if wal.is_some()
        && let Err(e) = txn.set_durability(Durability::None)
    {
        return (Vec::new(), Err(MetaError::CommitFailed(e.to_string())), unsynced_early);
    }
    let mut ctx = match WriteCtx::open_with(&txn, may_delete) {
        Ok(c) => c,
        Err(e) => return (Vec::new(), Err(e), unsynced_early),
    };
    let mut early = Vec::new();
    let mut responders = Vec::with_capacity(batch.len());
    for queued in batch {
        let responder = (queued.job)(&mut ctx);
        if queued.early && wal.is_some() {
            early.push(responder);
        } else {
            responders.push(responder);
        }
    }
    let effects = std::mem::take(&mut ctx.effects);
    let Some(w) = wal.as_mut() else {
        drop(ctx);
        return match txn.commit() {
            Ok(()) => (responders, Ok(effects), 0),
            Err(e) => (responders, Err(e.into()), 0),
        };
    };
    let marked = ctx.meta.insert(keys::WAL_SEQ, w.next_seq()).map(|_| ());
    let written = match marked {
        Ok(()) => w.write(ctx.take_changes()),
        Err(e) => Err(e.into()),
    };
    if early.is_empty() && unsynced_early == 0 {
        // Durable before redb sees it: no reader sees a batch a crash could still lose.
        if let Err(e) = written.and_then(|()| w.sync()) {
            // The transaction is dropped (aborted): nothing of the batch happened.
            return (responders, Err(e), 0);
        }
        drop(ctx);
        commit_logged(txn);
        return (responders, Ok(effects), 0);
    }
    // Visible before durable: early answers go out now.
    if let Err(e) = written {
        // Dropped (aborted); early batches logged before it stay as they were.
        responders.append(&mut early);
        return (responders, Err(e), unsynced_early);
    }
    drop(ctx);
    commit_logged(txn);
    let unsynced = unsynced_early + early.len();
    for respond in early {
        respond(Ok(()));
    }
    if responders.is_empty() && unsynced <= MAX_UNSYNCED_EARLY {
        return (responders, Ok(effects), unsynced);
    }
    sync_early(wal);
    (responders, Ok(effects), 0)
}

/// Commits to redb a batch that is in the log.
fn commit_logged(txn: redb::WriteTransaction) {
    if let Err(e) = txn.commit() {
        // The batch is in the log, so it will be replayed: answering "failed" now would
        // be a lie a restart contradicts. Nothing can be trusted in memory either.
        tracing::error!("metadata commit failed after its batch was logged: {e}; aborting so a restart replays it");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{META, get_counter};
    use redb::ReadableDatabase;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(crate::db::open(&dir.path().join("m.redb"), 1 << 20).unwrap());
        let committer = Committer::start(db.clone(), None, |_| {}, |_| false, Default::default());
        let mut tasks = vec![];
        for _ in 0..200 {
            let c = committer.clone();
            tasks.push(tokio::spawn(async move {
                c.write(|ctx| {
                    let v = get_counter(ctx.meta.table(), "test")?;
                    ctx.meta.insert("test", v + 1)?;
                    Ok(v)
                })
                .await
                .unwrap()
            }));
        }
        let mut seen: Vec<u64> = vec![];
        for t in tasks {
            seen.push(t.await.unwrap());
        }
        seen.sort();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        let r = db.begin_read().unwrap().open_table(META).unwrap();
        assert_eq!(get_counter(&r, "test").unwrap(), 200);
    }

    #[tokio::test]
    async fn failed_operation_does_not_fail_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(crate::db::open(&dir.path().join("m.redb"), 1 << 20).unwrap());
        let committer = Committer::start(db, None, |_| {}, |_| false, Default::default());
        let bad = committer.write(|_| Err::<(), _>(crate::error::not_found("x")));
        let good = committer.write(|ctx| {
            ctx.meta.insert("ok", 1)?;
            Ok(())
        });
        let (bad, good) = tokio::join!(bad, good);
        assert!(bad.is_err());
        good.unwrap();
    }
}
