//! The daemon's side of cluster membership: register with the metaserver, report what is
//! stored, heartbeat with usage, and carry out the deletions the metaserver asks for.
//!
//! Heartbeats also carry what the daemon has to report: pieces found corrupt (by reads and
//! scrubs, [`PieceStore::take_corrupt`]) and finished copy orders ([`Copier::take_done`]). They
//! stay pending here until a heartbeat carrying them is answered, across re-registrations.
//! Copy orders in heartbeat replies go to the [`Copier`].

use std::collections::BTreeSet;

use std::sync::Arc;
use std::time::Duration;

use dfs_proto::meta::{CopyDone, Heartbeat, Inventory, RegisterNode};
use dfs_proto::types::{NodeId, PieceId};
use dfs_proto::{ErrorKind, Peer, RpcError};
use tokio::task::spawn_blocking;

use crate::copier::Copier;
use crate::store::PieceStore;

const INVENTORY_BATCH: usize = 8192;
/// Besides at every registration, the daemon reports what it holds this often, so that pieces
/// left by writes that never committed are collected without waiting for a restart.
const INVENTORY_INTERVAL: Duration = Duration::from_secs(3600);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many corrupt pieces, and as many copy outcomes, go in one heartbeat (keeps it
/// well within a frame); the rest go in the next ones.
const REPORT_BATCH: usize = 8192;

pub struct Membership {
    pub store: Arc<PieceStore>,
    pub meta: Peer,
    pub name: String,
    pub advertise: String,
    pub heartbeat: Duration,
    /// Failure domain label sent when registering.
    pub domain: Option<String>,
    pub copier: Copier,
}

/// Reports waiting for a heartbeat that gets through.
#[derive(Default)]
struct Pending {
    corrupt: BTreeSet<PieceId>,
    missing: BTreeSet<PieceId>,
    copied: Vec<CopyDone>,
}

impl Pending {
    fn gather(&mut self, store: &PieceStore, copier: &Copier) {
        self.corrupt.extend(store.take_corrupt());
        self.missing.extend(store.take_missing());
        for done in copier.take_done() {
            self.copied.retain(|d| d.piece != done.piece);
            self.copied.push(done);
        }
    }

    /// What the next heartbeat carries: corrupt, missing, copied.
    fn batch(&self) -> (Vec<PieceId>, Vec<PieceId>, Vec<CopyDone>) {
        (
            self.corrupt.iter().copied().take(REPORT_BATCH).collect(),
            self.missing.iter().copied().take(REPORT_BATCH).collect(),
            self.copied.iter().take(REPORT_BATCH).cloned().collect(),
        )
    }

    /// Forgets what a heartbeat delivered.
    fn delivered(&mut self, corrupt: &[PieceId], missing: &[PieceId], copied: usize) {
        for p in corrupt {
            self.corrupt.remove(p);
        }
        for p in missing {
            self.missing.remove(p);
        }
        self.copied.drain(..copied);
    }

    fn is_empty(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.copied.is_empty()
    }
}

impl Membership {
    /// Runs for the life of the daemon, re-registering whenever the metaserver forgets it.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        let mut pending = Pending::default();
        loop {
            match self.registered_session(&mut pending).await {
                Ok(never) => match never {},
                Err(e) => tracing::warn!("metaserver {}: {e}; registering again in {backoff:?}", self.meta),
            }
            tokio::time::sleep(backoff).await;
            // Short: while the daemon is not registered, new data cannot be placed on it.
            backoff = (backoff * 2).min(self.heartbeat.max(Duration::from_millis(500)));
        }
    }

    async fn registered_session(&self, pending: &mut Pending) -> Result<std::convert::Infallible, RpcError> {
        let registered = self
            .meta
            .call(
                RegisterNode {
                    name: self.name.clone(),
                    addr: self.advertise.clone(),
                    usage: self.store.usage(),
                    domain: self.domain.clone(),
                },
                REQUEST_TIMEOUT,
            )
            .await?;
        let node = registered.node;
        tracing::info!(
            "registered with metaserver {} as node {node} ({})",
            self.meta,
            self.name
        );
        self.send_inventory(node).await?;
        let mut last_inventory = tokio::time::Instant::now();
        let mut deleted: Vec<PieceId> = Vec::new();
        let mut inventory_wanted = false;
        let mut checked_round = 0;
        loop {
            if last_inventory.elapsed() >= INVENTORY_INTERVAL || inventory_wanted {
                self.send_inventory(node).await?;
                last_inventory = tokio::time::Instant::now();
            }
            pending.gather(&self.store, &self.copier);
            let (corrupt, missing, copied) = pending.batch();
            let copied_count = copied.len();
            let beat = Heartbeat {
                node,
                usage: self.store.usage(),
                deleted: deleted.clone(),
                copied,
                corrupt: corrupt.clone(),
                missing: missing.clone(),
                checked_round,
            };
            let reply = match self.meta.call(beat, REQUEST_TIMEOUT).await {
                Ok(r) => r,
                Err(e) if e.remote_kind() == Some(ErrorKind::Stale) => {
                    tracing::info!(
                        "metaserver {} no longer knows node {node}: registering again",
                        self.meta
                    );
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            deleted.clear();
            inventory_wanted = reply.inventory_wanted;
            pending.delivered(&corrupt, &missing, copied_count);
            if !corrupt.is_empty() {
                tracing::info!("reported {} corrupt pieces to metaserver {}", corrupt.len(), self.meta);
            }
            if !missing.is_empty() {
                tracing::warn!(
                    "reported {} pieces missing here to metaserver {}",
                    missing.len(),
                    self.meta
                );
            }
            if !reply.check.is_empty() {
                // Checked now, so the next heartbeat carries the outcome.
                let (store, check) = (self.store.clone(), reply.check.clone());
                match spawn_blocking(move || store.check_present(&check)).await {
                    Ok(absent) => {
                        checked_round = reply.check_round;
                        tracing::info!(
                            "checked {} pieces the metaserver expects here: {absent} missing",
                            reply.check.len()
                        );
                    }
                    Err(e) => tracing::error!("cannot check pieces the metaserver expects here: {e}"),
                }
            }
            if !reply.delete.is_empty() {
                deleted = self.delete(reply.delete).await;
            }
            if !reply.copy.is_empty() {
                tracing::info!("metaserver {} orders {} piece copies", self.meta, reply.copy.len());
                self.copier.submit(reply.copy);
            }
            // Reports left over (beyond one heartbeat's worth) go right away too.
            if !reply.more && pending.is_empty() && reply.check.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(self.heartbeat) => {}
                    // A finished copy is reported at once: the metaserver orders the next.
                    _ = self.copier.finished() => {}
                }
            }
        }
    }

    /// Deletes pieces; returns those that are gone (including ones already missing).
    async fn delete(&self, pieces: Vec<PieceId>) -> Vec<PieceId> {
        let store = self.store.clone();
        spawn_blocking(move || {
            pieces
                .into_iter()
                .filter(|&p| match store.delete(p) {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::error!("cannot delete piece {p}: {e}");
                        false
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    async fn send_inventory(&self, node: NodeId) -> Result<(), RpcError> {
        let store = self.store.clone();
        let pieces = match spawn_blocking(move || store.inventory()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::error!("cannot list stored pieces: {e}");
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        let total = pieces.len();
        let mut batches = pieces.chunks(INVENTORY_BATCH).peekable();
        if batches.peek().is_none() {
            self.meta
                .call(
                    Inventory {
                        node,
                        pieces: vec![],
                        last: true,
                    },
                    REQUEST_TIMEOUT,
                )
                .await?;
        }
        while let Some(batch) = batches.next() {
            let last = batches.peek().is_none();
            let request = Inventory {
                node,
                pieces: batch.to_vec(),
                last,
            };
            self.meta.call(request, REQUEST_TIMEOUT).await?;
        }
        tracing::info!("reported {total} stored pieces to metaserver {}", self.meta);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_reports_leave_only_once_delivered() {
        let mut p = Pending::default();
        p.corrupt.extend((0..REPORT_BATCH as u64 + 5).rev());
        p.copied.push(CopyDone {
            piece: 1,
            outcome: Ok(3),
        });
        p.missing.insert(9);
        let (corrupt, missing, copied) = p.batch();
        assert_eq!(corrupt.len(), REPORT_BATCH);
        assert_eq!(missing, vec![9]);
        assert_eq!(copied.len(), 1);
        // Not delivered (the heartbeat failed): the same again.
        assert_eq!(p.batch(), (corrupt.clone(), missing.clone(), copied.clone()));
        // Found again meanwhile: still reported once.
        p.corrupt.insert(0);
        p.delivered(&corrupt, &missing, copied.len());
        assert!(!p.is_empty());
        let (rest, missing, copied) = p.batch();
        assert_eq!(rest, (REPORT_BATCH as u64..REPORT_BATCH as u64 + 5).collect::<Vec<_>>());
        assert!(copied.is_empty() && missing.is_empty());
        p.delivered(&rest, &[], 0);
        assert!(p.is_empty());
    }
}
