//! The metaserver's side of healing: scanning the chunk map with the `healer::Planner`,
//! handing copy orders to daemons in their heartbeat replies, recording finished copies,
//! dropping damaged copies, draining daemons, and collecting unreferenced pieces.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dfs_proto::ErrorKind;
use dfs_proto::meta::{CopyDone, CopyOrder, Drain, ForgetNode, ForgottenNode, NodeReport, NodeState as Liveness};
use dfs_proto::types::{NodeId, PieceId};
use redb::ReadableTable;

use crate::error::{MetaError, Result};
use crate::healer::{ChunkView, CopyKind, NodeView, PLAN_AHEAD, Planner, Trim};
use crate::namespace;
use crate::schema::ChunkRecord;
use crate::service::{MetaService, lock};

/// How often the chunk map is scanned for pieces needing copies (or less often on a large
/// cluster: scans take at most a tenth of the metaserver's time).
pub const SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// Soonest a scan follows the previous one when copies finish and more are waiting.
const EARLY_RESCAN: Duration = Duration::from_millis(10);

impl crate::healer::HealerState {
    pub fn scan_due(&self, now: Instant) -> bool {
        // Stale numbers (copies dropped since) are worth a scan as soon as the budget allows.
        let interval = if self.stale {
            EARLY_RESCAN.max(self.scan_took * 10)
        } else {
            SCAN_INTERVAL.max(self.scan_took * 10)
        };
        self.scanned_at
            .is_none_or(|t| now.saturating_duration_since(t) >= interval)
    }

    /// Whether copies just finished should be followed by a scan right away (so healing
    /// runs at the rate copies complete, not one batch per scan interval), still within the
    /// scans' tenth of the time.
    pub fn rescan_due(&self, now: Instant) -> bool {
        let interval = EARLY_RESCAN.max(self.scan_took * 10);
        self.backlog
            && self
                .scanned_at
                .is_none_or(|t| now.saturating_duration_since(t) >= interval)
    }
}
/// A copy handed out and not reported done within this long is planned again (its order or
/// its report may have been lost; a copy of even a large chunk takes seconds).
const COPY_TIMEOUT: Duration = Duration::from_secs(120);
/// Most orders handed to one daemon per heartbeat.
const ORDERS_PER_HEARTBEAT: usize = 64;

impl MetaService {
    /// Copy orders waiting for `node`.
    pub(crate) fn orders_for(&self, node: NodeId) -> Vec<CopyOrder> {
        let running = self.settings.copies_per_node.min(ORDERS_PER_HEARTBEAT as u32);
        let orders = lock(&self.healer).hand_out(node, running, Instant::now());
        if orders.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let registry = lock(&self.registry);
        orders
            .into_iter()
            .map(|c| CopyOrder {
                piece: c.piece,
                len: c.len,
                sources: c.sources.iter().map(|&s| registry.addr(s, now)).collect(),
            })
            .collect()
    }

    /// Records copies a daemon finished.
    pub(crate) async fn copies_done(&self, node: NodeId, done: Vec<CopyDone>) -> Result<()> {
        let mut recorded = Vec::new();
        let mut unknown = Vec::new();
        {
            let mut healer = lock(&self.healer);
            for d in done {
                let Some(flight) = healer.in_flight.remove(&(d.piece, node)) else {
                    if d.outcome.is_ok() {
                        unknown.push(d.piece);
                    }
                    continue;
                };
                match d.outcome {
                    Ok(_) => recorded.push(flight.copy),
                    Err(why) => tracing::warn!(
                        "copy of piece {} (inode {} chunk {}) onto node {node} failed: {why}",
                        d.piece,
                        flight.copy.ino,
                        flight.copy.chunk
                    ),
                }
            }
        }
        if recorded.is_empty() && unknown.is_empty() {
            return Ok(());
        }
        let copies = recorded.clone();
        let results = self
            .write(move |ctx| {
                // A copy nobody ordered (from before a restart) is not referenced: delete it.
                for piece in unknown {
                    if ctx.node_pieces.get((node, piece))?.is_none() {
                        ctx.deletes.insert((node, piece), ())?;
                    }
                }
                let mut results = Vec::new();
                for c in copies {
                    let from = match c.kind {
                        CopyKind::Move { from } => Some(from),
                        CopyKind::Repair => None,
                    };
                    results.push(namespace::add_replica(ctx, c.ino, c.chunk, c.piece, c.target, from)?);
                }
                Ok(results)
            })
            .await?;
        let mut healer = lock(&self.healer);
        for (c, kept) in recorded.iter().zip(results) {
            if !kept {
                continue;
            }
            match c.kind {
                CopyKind::Repair => healer.repairs_done += 1,
                CopyKind::Move { .. } => healer.moves_done += 1,
            }
        }
        Ok(())
    }

    /// A daemon found copies that fail their checksums: drop them (the repair re-makes them
    /// from a good copy), unless one is the last copy of its piece.
    pub(crate) async fn corrupt_reported(&self, node: NodeId, pieces: Vec<PieceId>) -> Result<()> {
        let outcomes = self
            .write(move |ctx| {
                let mut out = Vec::new();
                for piece in pieces {
                    let Some(v) = ctx.node_pieces.get((node, piece))?.map(|v| v.value()) else {
                        // Not referenced here anyway: just make sure it goes.
                        ctx.deletes.insert((node, piece), ())?;
                        continue;
                    };
                    let (ino, chunk, _) = v;
                    let dropped = namespace::remove_replica(ctx, ino, chunk, piece, node)?;
                    out.push((piece, ino, chunk, dropped));
                }
                Ok(out)
            })
            .await?;
        let name = lock(&self.registry).addr(node, Instant::now()).to_string();
        for (piece, ino, chunk, dropped) in outcomes {
            if dropped {
                tracing::warn!(
                    "storage daemon {name}: copy of piece {piece} (inode {ino} chunk {chunk}) is damaged; \
                     dropped it, a good copy will replace it"
                );
            } else {
                lock(&self.healer).corrupt_only.insert(piece);
                tracing::error!(
                    "storage daemon {name}: the only copy of piece {piece} (inode {ino} chunk {chunk}) is damaged: \
                     that part of the file is lost"
                );
            }
        }
        self.copies_dropped();
        Ok(())
    }

    /// A daemon found pieces absent that it was asked for or to check. Each copy it was
    /// recorded with is dropped (re-checked in the transaction: only while still recorded
    /// there), so the repair re-makes it from another copy; a last copy is kept in the record
    /// and counted as lost.
    pub(crate) async fn missing_reported(&self, node: NodeId, pieces: Vec<PieceId>) -> Result<()> {
        let outcomes = self
            .write(move |ctx| {
                let mut out = Vec::new();
                for piece in pieces {
                    let Some((ino, chunk, _)) = ctx.node_pieces.get((node, piece))?.map(|v| v.value()) else {
                        // Not recorded there (a stale reader, a deletion done): nothing lost.
                        continue;
                    };
                    let dropped = namespace::remove_replica(ctx, ino, chunk, piece, node)?;
                    out.push((piece, ino, chunk, dropped));
                }
                Ok(out)
            })
            .await?;
        if outcomes.is_empty() {
            return Ok(());
        }
        let name = lock(&self.registry).addr(node, Instant::now()).to_string();
        let mut dropped = 0;
        for (piece, ino, chunk, was_dropped) in outcomes {
            if was_dropped {
                dropped += 1;
                tracing::debug!("storage daemon {name} lacks its copy of piece {piece} (inode {ino} chunk {chunk})");
            } else {
                lock(&self.healer).missing_only.insert(piece);
                tracing::error!(
                    "storage daemon {name} lacks the only copy of piece {piece} (inode {ino} chunk {chunk}): \
                     that part of the file is lost unless the daemon's data comes back"
                );
            }
        }
        if dropped > 0 {
            tracing::warn!(
                "storage daemon {name} lacks {dropped} copies it was recorded with: dropped them, \
                 the repair re-makes them from the other copies"
            );
        }
        self.copies_dropped();
        Ok(())
    }

    /// Scans the chunk map, plans repairs, moves and trims, and carries out the trims.
    pub(crate) async fn heal(&self) -> Result<()> {
        let Ok(scan) = self.scanning.try_lock() else {
            return Ok(());
        };
        self.scan_locked(scan).await
    }

    /// Scans now, after the scan under way if there is one (status reports must not come
    /// from a scan older than a change they know of).
    pub(crate) async fn heal_now(&self) -> Result<()> {
        let scan = self.scanning.lock().await;
        if !lock(&self.healer).stale {
            // The scan just finished began after the change.
            return Ok(());
        }
        self.scan_locked(scan).await
    }

    /// Copies were dropped: the last scan's numbers no longer hold; scan again.
    /// Copies were dropped: the last scan's numbers no longer hold. A scan follows soon, from
    /// housekeeping (not here: reports arrive in heartbeats, which must stay quick), and a
    /// status report before it scans first.
    fn copies_dropped(&self) {
        lock(&self.healer).stale = true;
        self.reaper_signal().notify_one();
    }

    async fn scan_locked(&self, _scan: tokio::sync::MutexGuard<'_, ()>) -> Result<()> {
        lock(&self.healer).stale = false;
        let now = Instant::now();
        let (views, up): (Vec<NodeView>, HashSet<NodeId>) = {
            let registry = lock(&self.registry);
            let loads: std::collections::HashMap<NodeId, (u64, u64)> =
                registry.loads(now).into_iter().map(|(id, b, c)| (id, (b, c))).collect();
            let mut up = HashSet::new();
            let views = registry
                .ids()
                .map(|id| {
                    let n = registry.node(id).expect("listed");
                    let liveness = registry.liveness(id, now);
                    if liveness == Liveness::Up {
                        up.insert(id);
                    }
                    NodeView {
                        id,
                        liveness,
                        draining: n.draining,
                        domain: registry.domain(id),
                        takes_data: loads.contains_key(&id),
                        bytes: n.referenced_bytes + n.pending_bytes,
                        capacity: loads.get(&id).map_or(0, |l| l.1),
                    }
                })
                .collect();
            (views, up)
        };
        let busy = {
            let mut healer = lock(&self.healer);
            for f in healer.expire(now, COPY_TIMEOUT, |n| up.contains(&n)) {
                tracing::warn!(
                    "copy of piece {} onto node {} not reported done: planning it again",
                    f.copy.piece,
                    f.copy.target
                );
            }
            healer.busy()
        };
        // Pieces whose only copy is unusable: counted as lost, never a source.
        let corrupt_only: HashSet<PieceId> = {
            let healer = lock(&self.healer);
            healer.corrupt_only.union(&healer.missing_only).copied().collect()
        };
        let settings = self.settings.clone();
        let plan = self
            .read(move |r| {
                let deletes = &r.deletes;
                let mut planner = Planner::new(
                    views,
                    &busy,
                    settings.copies_per_node.saturating_mul(PLAN_AHEAD),
                    settings.balance_threshold_percent,
                    &corrupt_only,
                )
                .with_queued_deletes(|node, piece| deletes.get((node, piece)).is_ok_and(|row| row.is_some()));
                let mut factor = (0, settings.replicas);
                for item in r.chunks.iter()? {
                    let (key, value) = item?;
                    let (ino, chunk) = key.value();
                    let c = ChunkRecord::decode(ino, chunk, value.value())?;
                    if factor.0 != ino {
                        factor = (ino, namespace::replicas_of(r, ino, settings.replicas)?);
                    }
                    planner.chunk(ChunkView {
                        ino,
                        chunk,
                        piece: c.piece,
                        len: c.len,
                        nodes: c.nodes,
                        replicas: factor.1,
                    });
                }
                Ok(planner.finish())
            })
            .await?;
        {
            let mut healer = lock(&self.healer);
            healer.last = plan.stats.clone();
            healer.scanned_at = Some(now);
            healer.scan_took = now.elapsed();
            if !plan.copies.is_empty() {
                let repairs = plan.copies.iter().filter(|c| c.kind == CopyKind::Repair).count();
                tracing::info!(
                    "ordering {repairs} repair copies and {} moves",
                    plan.copies.len() - repairs
                );
            }
            healer.dispatch(plan.copies, now);
            let repairs_in_flight = healer
                .in_flight
                .values()
                .filter(|f| f.copy.kind == CopyKind::Repair)
                .count();
            healer.backlog = plan.stats.under_replicated as usize > repairs_in_flight;
        }
        if !plan.trims.is_empty() {
            self.trim(plan.trims).await?;
        }
        self.collect_young_unreferenced(now).await
    }

    async fn trim(&self, trims: Vec<Trim>) -> Result<()> {
        let n = trims.len();
        let dropped = self
            .write(move |ctx| {
                let mut dropped = 0;
                for t in trims {
                    if namespace::remove_replica(ctx, t.ino, t.chunk, t.piece, t.node)? {
                        dropped += 1;
                    }
                }
                Ok(dropped)
            })
            .await?;
        tracing::info!("dropped {dropped} of {n} surplus copies (dead, drained or over the replication factor)");
        Ok(())
    }

    /// Queues for deletion the unreferenced pieces whose grace period has now passed.
    async fn collect_young_unreferenced(&self, now: Instant) -> Result<()> {
        let due: Vec<(NodeId, PieceId)> = {
            let mut young = lock(&self.young_unreferenced);
            let due: Vec<_> = young.iter().filter(|(_, t)| **t <= now).map(|(k, _)| *k).collect();
            for k in &due {
                young.remove(k);
            }
            due
        };
        let due: Vec<_> = {
            let registry = lock(&self.registry);
            due.into_iter().filter(|(_, p)| !registry.is_pending(*p)).collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        let queued = self
            .write(move |ctx| {
                let mut queued = 0;
                for (node, piece) in due {
                    if ctx.node_pieces.get((node, piece))?.is_none() {
                        ctx.deletes.insert((node, piece), ())?;
                        queued += 1;
                    }
                }
                Ok(queued)
            })
            .await?;
        if queued > 0 {
            tracing::info!("queued {queued} pieces that no file references for deletion");
        }
        Ok(())
    }

    /// `dfs node forget`: removes a daemon that is not up for good (see
    /// `namespace::forget_node`).
    pub async fn forget_node(&self, req: ForgetNode) -> Result<ForgottenNode> {
        let name = req.node.clone();
        let registry = self.registry.clone();
        // Checked in the transaction, so a daemon registering meanwhile is not forgotten.
        let (id, copies_dropped, deletions_dropped) = self
            .write(move |ctx| {
                let up = {
                    let registry = lock(&registry);
                    let now = Instant::now();
                    registry
                        .ids()
                        .any(|id| registry.node(id).is_some_and(|n| n.name == name) && registry.liveness(id, now) == Liveness::Up)
                };
                if up {
                    return Err(MetaError::fs(
                        ErrorKind::Busy,
                        format!("storage daemon {name} is up: stop it first (drain it before, if it holds data: dfs drain {name})"),
                    ));
                }
                namespace::forget_node(ctx, &name)
            })
            .await?;
        lock(&self.registry).remove(id);
        {
            let mut healer = lock(&self.healer);
            healer.in_flight.retain(|k, _| k.1 != id);
            healer.outbox.remove(&id);
        }
        lock(&self.presence_checks).remove(&id);
        lock(&self.young_unreferenced).retain(|(node, _), _| *node != id);
        tracing::warn!(
            "storage daemon {} (node {id}) forgotten: {copies_dropped} copies recorded there and \
             {deletions_dropped} queued deletions dropped",
            req.node
        );
        self.copies_dropped();
        Ok(ForgottenNode {
            copies_dropped,
            deletions_dropped,
        })
    }

    pub async fn drain(&self, req: Drain) -> Result<NodeReport> {
        let name = req.node.clone();
        let draining = !req.cancel;
        let (id, _) = self
            .write(move |ctx| namespace::set_draining(ctx, &name, draining))
            .await?;
        lock(&self.registry).set_draining(id, draining);
        if draining {
            tracing::info!(
                "draining storage daemon {} (node {id}): its data moves to the others",
                req.node
            );
        } else {
            tracing::info!("no longer draining storage daemon {} (node {id})", req.node);
        }
        let report = self.cluster_status(dfs_proto::meta::ClusterStatus {}).await?;
        report
            .nodes
            .into_iter()
            .find(|n| n.node.id == id)
            .ok_or_else(|| MetaError::fs(ErrorKind::NotFound, format!("storage daemon {}", req.node)))
    }
}
