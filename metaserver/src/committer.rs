//! Group commit: one thread owns writing. Operations queue up while a commit is being made
//! durable; the next transaction applies all of them and pays for one fsync. An operation is
//! answered only after the transaction holding it is durable.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

use redb::Database;
use tokio::sync::oneshot;

use crate::db::{Effects, WriteCtx};
use crate::error::{MetaError, Result};

type Responder = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn for<'t> FnOnce(&mut WriteCtx<'t>) -> Responder + Send>;

/// Most operations in one transaction.
const MAX_BATCH: usize = 1024;

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
        on_commit: impl Fn(Option<Effects>) + Send + 'static,
        may_delete: impl Fn(u64) -> bool + Send + Sync + 'static,
    ) -> Self {
        let (jobs, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| commit_loop(&db, rx, &on_commit, &may_delete));
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
    rx: Receiver<Job>,
    on_commit: &dyn Fn(Option<Effects>),
    may_delete: &(dyn Fn(u64) -> bool + Sync),
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (responders, outcome) = run_batch(db, batch, may_delete);
        let (result, effects) = match outcome {
            Ok(effects) => (Ok(()), Some(effects)),
            Err(e) => {
                tracing::error!("metadata transaction failed: {e}");
                (Err(e.to_string()), None)
            }
        };
        on_commit(effects);
        for respond in responders {
            respond(result.clone());
        }
    }
}

/// Applies a batch in one transaction. Jobs of a batch whose transaction cannot even start are
/// dropped, which their callers see as a failed commit.
fn run_batch(
    db: &Database,
    batch: Vec<Job>,
    may_delete: &(dyn Fn(u64) -> bool + Sync),
) -> (Vec<Responder>, Result<Effects>) {
    let txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => return (Vec::new(), Err(e.into())),
    };
    let mut ctx = match WriteCtx::open_with(&txn, may_delete) {
        Ok(c) => c,
        Err(e) => return (Vec::new(), Err(e)),
    };
    let responders: Vec<Responder> = batch.into_iter().map(|job| job(&mut ctx)).collect();
    let effects = std::mem::take(&mut ctx.effects);
    drop(ctx);
    match txn.commit() {
        Ok(()) => (responders, Ok(effects)),
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
        let committer = Committer::start(db.clone(), |_| {}, |_| false);
        let mut tasks = vec![];
        for _ in 0..200 {
            let c = committer.clone();
            tasks.push(tokio::spawn(async move {
                c.write(|ctx| {
                    let v = get_counter(&ctx.meta, "test")?;
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
        let committer = Committer::start(db, |_| {}, |_| false);
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
