//! Group commit: one thread owns writing. Operations queue up while a commit is being made
//! durable; the next transaction applies all of them and pays for one fsync. An operation is
//! answered only after the transaction holding it is durable: its record fsync'd in the
//! write-ahead log (`wal`), or, without a log, redb's own durable commit.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use redb::{Database, Durability};
use tokio::sync::oneshot;

use crate::db::{Effects, WriteCtx};
use crate::error::{MetaError, Result};
use crate::metrics::CommitMetrics;
use crate::schema::keys;
use crate::wal::Wal;

type Responder = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn for<'t> FnOnce(&mut WriteCtx<'t>) -> Responder + Send>;

/// Most operations in one transaction.
const MAX_BATCH: usize = 1024;
/// With nothing to do for this long, the log's batches are checkpointed into redb.
const IDLE_CHECKPOINT: Duration = Duration::from_millis(500);
/// Under steady load, a checkpoint at least this often (bounds the replay after a crash).
const MAX_ROUND: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Committer {
    jobs: Sender<Job>,
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
        let (jobs, rx) = channel::<Job>();
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
        self.jobs.send(job).map_err(|_| MetaError::ShuttingDown)?;
        rx.await
            .map_err(|_| MetaError::CommitFailed("the metadata transaction could not start".into()))?
    }
}

fn commit_loop(
    db: &Database,
    mut wal: Option<Wal>,
    rx: Receiver<Job>,
    on_commit: &dyn Fn(Option<Effects>),
    may_delete: &(dyn Fn(u64) -> bool + Sync),
    metrics: &CommitMetrics,
) {
    loop {
        let first = match wal.as_ref().filter(|w| w.has_records()) {
            Some(_) => match rx.recv_timeout(IDLE_CHECKPOINT) {
                Ok(job) => job,
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
        let started = std::time::Instant::now();
        let (responders, outcome) = run_batch(db, &mut wal, batch, may_delete);
        metrics.duration.observe(started.elapsed().as_secs_f64());
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
            checkpoint(db, &mut wal, metrics);
        }
    }
    if wal.as_ref().is_some_and(|w| w.has_records()) {
        checkpoint(db, &mut wal, metrics);
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
/// dropped, which their callers see as a failed commit.
fn run_batch(
    db: &Database,
    wal: &mut Option<Wal>,
    batch: Vec<Job>,
    may_delete: &(dyn Fn(u64) -> bool + Sync),
) -> (Vec<Responder>, Result<Effects>) {
    let mut txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => return (Vec::new(), Err(e.into())),
    };
    if wal.is_some()
        && let Err(e) = txn.set_durability(Durability::None)
    {
        return (Vec::new(), Err(MetaError::CommitFailed(e.to_string())));
    }
    let mut ctx = match WriteCtx::open_with(&txn, may_delete) {
        Ok(c) => c,
        Err(e) => return (Vec::new(), Err(e)),
    };
    let responders: Vec<Responder> = batch.into_iter().map(|job| job(&mut ctx)).collect();
    let effects = std::mem::take(&mut ctx.effects);
    if let Some(w) = wal.as_mut() {
        // Logged before redb sees it: no reader can see a batch a crash could still lose.
        let marked = ctx.meta.insert(keys::WAL_SEQ, w.next_seq()).map(|_| ());
        let logged = match marked {
            Ok(()) => w.append(ctx.take_changes()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = logged {
            // The transaction is dropped (aborted): nothing of the batch happened.
            return (responders, Err(e));
        }
    }
    drop(ctx);
    match txn.commit() {
        Ok(()) => (responders, Ok(effects)),
        Err(e) if wal.is_some() => {
            // The batch is in the log, so it will be replayed: answering "failed" now would
            // be a lie a restart contradicts. Nothing can be trusted in memory either.
            tracing::error!("metadata commit failed after its batch was logged: {e}; aborting so a restart replays it");
            std::process::abort();
        }
        Err(e) => (responders, Err(e.into())),
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
