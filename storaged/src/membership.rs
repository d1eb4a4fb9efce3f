//! The daemon's side of cluster membership: register with the metaserver, report what is
//! stored, heartbeat with usage, and carry out the deletions the metaserver asks for.

use std::sync::Arc;
use std::time::Duration;

use dfs_proto::meta::{Heartbeat, Inventory, RegisterNode};
use dfs_proto::types::{NodeId, PieceId};
use dfs_proto::{ErrorKind, Peer, RpcError};
use tokio::task::spawn_blocking;

use crate::store::PieceStore;

const INVENTORY_BATCH: usize = 8192;
/// Besides at every registration, the daemon reports what it holds this often, so that pieces
/// left by writes that never committed are collected without waiting for a restart.
const INVENTORY_INTERVAL: Duration = Duration::from_secs(3600);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Membership {
    pub store: Arc<PieceStore>,
    pub meta: Peer,
    pub name: String,
    pub advertise: String,
    pub heartbeat: Duration,
}

impl Membership {
    /// Runs for the life of the daemon, re-registering whenever the metaserver forgets it.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.registered_session().await {
                Ok(never) => match never {},
                Err(e) => tracing::warn!("metaserver {}: {e}; registering again in {backoff:?}", self.meta),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.heartbeat.max(Duration::from_secs(2)));
        }
    }

    async fn registered_session(&self) -> Result<std::convert::Infallible, RpcError> {
        let registered = self
            .meta
            .call(
                RegisterNode {
                    name: self.name.clone(),
                    addr: self.advertise.clone(),
                    usage: self.store.usage(),
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
        loop {
            if last_inventory.elapsed() >= INVENTORY_INTERVAL {
                self.send_inventory(node).await?;
                last_inventory = tokio::time::Instant::now();
            }
            let beat = Heartbeat {
                node,
                usage: self.store.usage(),
                deleted: deleted.clone(),
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
            if !reply.delete.is_empty() {
                deleted = self.delete(reply.delete).await;
            }
            if !reply.more {
                tokio::time::sleep(self.heartbeat).await;
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
