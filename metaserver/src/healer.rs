//! Keeping every piece at its replication factor, and the daemons balanced.
//!
//! Every few seconds the metaserver scans the chunk map (`Planner`, plain code over plain
//! data, unit-tested here) and decides:
//! - **repairs**: a piece with fewer counted copies than its factor gets new copies, read from
//!   a surviving copy. A copy counts if its daemon is up, or down for less than the grace period
//!   (`dead_after_secs`: a restart must not set off a storm of copies), and not draining. The
//!   pieces with the fewest copies left go first.
//! - **moves**: a copy on a draining daemon is copied elsewhere, then dropped; while daemons'
//!   stored bytes differ from their fair share by more than the threshold, copies move from the
//!   fullest to the emptiest. A move copies first, the metaserver then switches the location,
//!   and only then is the old copy deleted: a reader never finds a piece missing.
//! - **trims**: once a piece has enough copies on daemons that are up, copies on dead or
//!   draining daemons (and surplus ones, after a factor was lowered) are dropped and queued
//!   for deletion, so a daemon returning from the dead deletes what it no longer needs.
//!
//! Copies are made by the target daemon (a `CopyOrder` in its heartbeat reply), at most
//! `copies_per_node` at once per daemon: that bounds the rate of healing. A scan may plan
//! more than that per daemon (a queue, [`PLAN_AHEAD`] times as many); the queue is handed out
//! as copies finish, so healing runs at the pace copies complete rather than one batch per
//! scan.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use dfs_proto::meta::{NodeState as Liveness, Redundancy};
use dfs_proto::types::{Ino, NodeId, PieceId};

/// How many copies per daemon a scan may plan ahead, as a multiple of those running at once.
pub const PLAN_AHEAD: u32 = 16;
/// Candidates for balancing moves remembered per daemon during a scan.
const MOVE_CANDIDATES_PER_NODE: usize = 512;
/// Imbalance below this many bytes is never worth a move.
pub const MIN_IMBALANCE: u64 = 1 << 20;

/// A daemon as the planner sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: NodeId,
    pub liveness: Liveness,
    pub draining: bool,
    pub domain: String,
    /// Up, registered since the metaserver started, not draining, with room: may receive copies.
    pub takes_data: bool,
    pub bytes: u64,
    pub capacity: u64,
}

/// One chunk with data.
#[derive(Debug, Clone)]
pub struct ChunkView {
    pub ino: Ino,
    pub chunk: u64,
    pub piece: PieceId,
    pub len: u64,
    pub nodes: Vec<NodeId>,
    pub replicas: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Repair,
    /// The copy on `from` is dropped once the new one is recorded.
    Move {
        from: NodeId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCopy {
    pub ino: Ino,
    pub chunk: u64,
    pub piece: PieceId,
    pub len: u64,
    pub target: NodeId,
    /// Daemons to read from, in order of preference.
    pub sources: Vec<NodeId>,
    pub kind: CopyKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trim {
    pub ino: Ino,
    pub chunk: u64,
    pub piece: PieceId,
    pub node: NodeId,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub copies: Vec<PlannedCopy>,
    pub trims: Vec<Trim>,
    pub stats: Redundancy,
}

/// Copies already under way, by piece, with their target daemon.
#[derive(Debug, Default, Clone)]
pub struct Busy {
    pub targets_of: HashMap<PieceId, Vec<NodeId>>,
    pub per_node: HashMap<NodeId, u32>,
}

struct RepairNeed {
    view: ChunkView,
    counted: usize,
    missing: usize,
    from: Option<NodeId>,
    sources: Vec<NodeId>,
}

pub struct Planner<'a> {
    nodes: HashMap<NodeId, NodeView>,
    busy: &'a Busy,
    copies_per_node: u32,
    threshold_percent: u64,
    corrupt_only: &'a HashSet<PieceId>,
    needs: Vec<RepairNeed>,
    movable: HashMap<NodeId, Vec<ChunkView>>,
    /// Whether a deletion of the piece is queued for the daemon: a copy made there would be
    /// deleted by it (the daemon may be carrying it out already), so none is planned there.
    delete_queued: Box<dyn Fn(NodeId, PieceId) -> bool + 'a>,
    plan: Plan,
}

impl<'a> Planner<'a> {
    pub fn new(
        nodes: Vec<NodeView>,
        busy: &'a Busy,
        copies_per_node: u32,
        threshold_percent: u64,
        corrupt_only: &'a HashSet<PieceId>,
    ) -> Self {
        Planner {
            nodes: nodes.into_iter().map(|n| (n.id, n)).collect(),
            busy,
            copies_per_node,
            threshold_percent,
            corrupt_only,
            needs: Vec::new(),
            movable: HashMap::new(),
            delete_queued: Box::new(|_, _| false),
            plan: Plan::default(),
        }
    }

    /// Tells the planner which (daemon, piece) deletions are queued.
    pub fn with_queued_deletes(mut self, queued: impl Fn(NodeId, PieceId) -> bool + 'a) -> Self {
        self.delete_queued = Box::new(queued);
        self
    }

    fn liveness(&self, id: NodeId) -> Liveness {
        self.nodes.get(&id).map_or(Liveness::Dead, |n| n.liveness)
    }

    fn draining(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.draining)
    }

    /// Looks at one chunk: counts it, and notes what it needs.
    pub fn chunk(&mut self, c: ChunkView) {
        let wanted = c.replicas.max(1) as usize;
        let stats = &mut self.plan.stats;
        stats.pieces += 1;
        stats.copies += c.nodes.len() as u64;
        let (mut good, mut waiting, mut readable, mut alive) = (0, 0, 0, 0);
        let mut draining_copy = None;
        for &n in &c.nodes {
            let live = self.liveness(n);
            let draining = self.draining(n);
            if live != Liveness::Dead {
                alive += 1;
            }
            if live == Liveness::Up {
                readable += 1;
            }
            match (live, draining) {
                (Liveness::Up, false) => good += 1,
                (Liveness::Down, false) => waiting += 1,
                (Liveness::Up | Liveness::Down, true) => draining_copy = draining_copy.or(Some(n)),
                _ => {}
            }
        }
        let stats = &mut self.plan.stats;
        if good < wanted {
            stats.under_replicated += 1;
        }
        if readable == 0 {
            stats.unavailable += 1;
        }
        if alive == 0 || (c.nodes.len() == 1 && self.corrupt_only.contains(&c.piece)) {
            stats.lost += 1;
        }
        let in_flight = self.busy.targets_of.get(&c.piece).map_or(0, Vec::len);
        let counted = good + waiting;
        if counted + in_flight < wanted {
            let mut sources: Vec<NodeId> = c
                .nodes
                .iter()
                .copied()
                .filter(|&n| self.liveness(n) == Liveness::Up && !self.corrupt_only.contains(&c.piece))
                .collect();
            // Copies on daemons staying in the cluster are read first; a draining one last.
            sources.sort_by_key(|&n| self.draining(n));
            if !sources.is_empty() {
                self.needs.push(RepairNeed {
                    counted,
                    missing: wanted - counted - in_flight,
                    from: draining_copy,
                    sources,
                    view: c,
                });
            }
            return;
        }
        if in_flight > 0 {
            return;
        }
        // Enough copies on daemons that are up: drop the ones on dead and draining daemons,
        // then any surplus (a lowered factor), from the fullest daemons.
        if good >= wanted {
            let mut doomed: Vec<NodeId> = c
                .nodes
                .iter()
                .copied()
                .filter(|&n| self.liveness(n) == Liveness::Dead || self.draining(n))
                .collect();
            let mut keep: Vec<NodeId> = c
                .nodes
                .iter()
                .copied()
                .filter(|&n| self.liveness(n) == Liveness::Up && !self.draining(n))
                .collect();
            keep.sort_by_key(|n| std::cmp::Reverse(self.nodes.get(n).map_or(0, |v| v.bytes)));
            while keep.len() > wanted {
                doomed.push(keep.remove(0));
            }
            for node in doomed {
                self.plan.trims.push(Trim {
                    ino: c.ino,
                    chunk: c.chunk,
                    piece: c.piece,
                    node,
                });
            }
            if good == wanted && waiting == 0 && c.nodes.len() == wanted {
                for &n in &c.nodes {
                    let list = self.movable.entry(n).or_default();
                    if list.len() < MOVE_CANDIDATES_PER_NODE {
                        list.push(c.clone());
                    }
                }
            }
        }
    }

    fn room(&self, node: NodeId, planned: &HashMap<NodeId, u32>) -> bool {
        let busy = self.busy.per_node.get(&node).copied().unwrap_or(0) + planned.get(&node).copied().unwrap_or(0);
        busy < self.copies_per_node
    }

    /// A target for a copy of `piece`, held by `holders`: takes data, has room for another
    /// copy, holds none, has no deletion of it queued, least loaded, in a failure domain none
    /// of `holders` is in if possible.
    fn target(&self, piece: PieceId, holders: &[NodeId], planned: &HashMap<NodeId, u32>) -> Option<NodeId> {
        let domains: HashSet<&str> = holders
            .iter()
            .filter_map(|h| self.nodes.get(h))
            .map(|n| n.domain.as_str())
            .collect();
        let mut candidates: Vec<&NodeView> = self
            .nodes
            .values()
            .filter(|n| {
                n.takes_data
                    && !holders.contains(&n.id)
                    && self.room(n.id, planned)
                    && !(self.delete_queued)(n.id, piece)
            })
            .collect();
        candidates.sort_by_key(|n| (domains.contains(n.domain.as_str()), n.bytes, n.id));
        candidates.first().map(|n| n.id)
    }

    /// Turns what the scan found into copies (repairs first, most endangered first, then
    /// balancing moves) and trims.
    pub fn finish(mut self) -> Plan {
        let mut planned: HashMap<NodeId, u32> = HashMap::new();
        let mut needs = std::mem::take(&mut self.needs);
        needs.sort_by_key(|n| (n.counted, n.view.ino, n.view.chunk));
        let repairs_needed = !needs.is_empty();
        for need in needs {
            let mut holders = need.view.nodes.clone();
            holders.extend(self.busy.targets_of.get(&need.view.piece).into_iter().flatten());
            for _ in 0..need.missing {
                let Some(target) = self.target(need.view.piece, &holders, &planned) else {
                    break;
                };
                *planned.entry(target).or_default() += 1;
                holders.push(target);
                if let Some(n) = self.nodes.get_mut(&target) {
                    n.bytes += need.view.len;
                }
                let kind = match need.from {
                    Some(from) => CopyKind::Move { from },
                    None => CopyKind::Repair,
                };
                self.plan.copies.push(PlannedCopy {
                    ino: need.view.ino,
                    chunk: need.view.chunk,
                    piece: need.view.piece,
                    len: need.view.len,
                    target,
                    sources: need.sources.clone(),
                    kind,
                });
            }
        }
        if !repairs_needed {
            self.balance(&mut planned);
        }
        self.plan
    }

    /// Each daemon's fair share of the stored bytes, by capacity.
    fn shares(&self) -> Vec<(NodeId, u64, u64)> {
        let takers: Vec<&NodeView> = self.nodes.values().filter(|n| n.takes_data).collect();
        let total: u64 = takers.iter().map(|n| n.bytes).sum();
        let capacity: u128 = takers.iter().map(|n| n.capacity as u128).sum();
        takers
            .iter()
            .map(|n| {
                let share = match (total as u128 * n.capacity as u128).checked_div(capacity) {
                    Some(s) => s as u64,
                    None => total / takers.len().max(1) as u64,
                };
                (n.id, n.bytes, share)
            })
            .collect()
    }

    fn tolerance(&self, share: u64) -> u64 {
        (share * self.threshold_percent / 100).max(MIN_IMBALANCE)
    }

    fn balance(&mut self, planned: &mut HashMap<NodeId, u32>) {
        let in_flight_moves = self.busy.per_node.values().sum::<u32>() > 0;
        if in_flight_moves && planned.is_empty() {
            // Decide again once the moves under way are recorded.
            return;
        }
        let mut moved: HashSet<PieceId> = HashSet::new();
        loop {
            let shares = self.shares();
            let Some(&(heavy, heavy_bytes, heavy_share)) = shares.iter().max_by_key(|s| s.1 as i128 - s.2 as i128)
            else {
                return;
            };
            let Some(&(light, light_bytes, light_share)) = shares.iter().min_by_key(|s| s.1 as i128 - s.2 as i128)
            else {
                return;
            };
            let over = heavy_bytes.saturating_sub(heavy_share);
            let under = light_share.saturating_sub(light_bytes);
            if heavy == light || (over <= self.tolerance(heavy_share) && under <= self.tolerance(light_share)) {
                return;
            }
            if !self.room(light, planned) || !self.room(heavy, planned) {
                return;
            }
            let gap = heavy_bytes.saturating_sub(light_bytes);
            let light_domain = self.nodes[&light].domain.clone();
            let candidate = self.movable.get(&heavy).and_then(|list| {
                list.iter()
                    .position(|c| {
                        c.len > 0
                            && c.len <= gap / 2
                            && !moved.contains(&c.piece)
                            && !c.nodes.contains(&light)
                            && !(self.delete_queued)(light, c.piece)
                            && !c
                                .nodes
                                .iter()
                                .any(|&n| n != heavy && self.nodes.get(&n).is_some_and(|v| v.domain == light_domain))
                    })
                    .map(|i| list[i].clone())
            });
            let Some(c) = candidate else { return };
            moved.insert(c.piece);
            *planned.entry(light).or_default() += 1;
            *planned.entry(heavy).or_default() += 1;
            if let Some(n) = self.nodes.get_mut(&light) {
                n.bytes += c.len;
            }
            if let Some(n) = self.nodes.get_mut(&heavy) {
                n.bytes -= c.len.min(n.bytes);
            }
            let mut sources = vec![heavy];
            sources.extend(c.nodes.iter().copied().filter(|&n| n != heavy));
            self.plan.copies.push(PlannedCopy {
                ino: c.ino,
                chunk: c.chunk,
                piece: c.piece,
                len: c.len,
                target: light,
                sources,
                kind: CopyKind::Move { from: heavy },
            });
        }
    }
}

/// A copy planned and not yet reported done: queued for its target, or handed out to it.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub copy: PlannedCopy,
    /// When it was planned, or handed out once it was.
    pub since: Instant,
    pub handed_out: bool,
}

/// The healer's memory between scans: copies under way, orders not yet delivered, and the
/// numbers `dfs status` shows.
#[derive(Debug, Default)]
pub struct HealerState {
    pub in_flight: HashMap<(PieceId, NodeId), InFlight>,
    /// Orders waiting for their target's next heartbeat.
    pub outbox: HashMap<NodeId, Vec<PlannedCopy>>,
    /// Pieces whose only copy failed its checksum.
    pub corrupt_only: HashSet<PieceId>,
    /// Pieces whose only recorded copy is not on its daemon (reported missing).
    pub missing_only: HashSet<PieceId>,
    pub last: Redundancy,
    pub scanned_at: Option<Instant>,
    /// How long the last scan took: scans are spaced to take at most a tenth of the time.
    pub scan_took: Duration,
    /// Copies were dropped since the last scan began (missing, damaged): its numbers are
    /// out of date, and the next status report scans first.
    pub stale: bool,
    /// The last scan found more pieces needing copies than it could order (the rate bound):
    /// the next scan may come as soon as copies finish.
    pub backlog: bool,
    pub repairs_done: u64,
    pub moves_done: u64,
}

impl HealerState {
    pub fn busy(&self) -> Busy {
        let mut busy = Busy::default();
        for &(piece, target) in self.in_flight.keys() {
            busy.targets_of.entry(piece).or_default().push(target);
            *busy.per_node.entry(target).or_default() += 1;
        }
        busy
    }

    /// Records planned copies as under way and queues them for their targets.
    pub fn dispatch(&mut self, copies: Vec<PlannedCopy>, now: Instant) {
        for copy in copies {
            let key = (copy.piece, copy.target);
            if self.in_flight.contains_key(&key) {
                continue;
            }
            self.outbox.entry(copy.target).or_default().push(copy.clone());
            self.in_flight.insert(
                key,
                InFlight {
                    copy,
                    since: now,
                    handed_out: false,
                },
            );
        }
    }

    /// The next orders for `node`: as many queued copies as keep at most `running` of its
    /// copies handed out at once.
    pub fn hand_out(&mut self, node: NodeId, running: u32, now: Instant) -> Vec<PlannedCopy> {
        let busy = self
            .in_flight
            .values()
            .filter(|f| f.handed_out && f.copy.target == node)
            .count();
        let room = (running as usize).saturating_sub(busy);
        let Some(queue) = self.outbox.get_mut(&node) else {
            return Vec::new();
        };
        let take = queue.len().min(room);
        let orders: Vec<PlannedCopy> = queue.drain(..take).collect();
        if queue.is_empty() {
            self.outbox.remove(&node);
        }
        for o in &orders {
            if let Some(f) = self.in_flight.get_mut(&(o.piece, node)) {
                f.handed_out = true;
                f.since = now;
            }
        }
        orders
    }

    /// Forgets copies that took too long or whose target is no longer up: planned again.
    pub fn expire(&mut self, now: Instant, max_age: Duration, up: impl Fn(NodeId) -> bool) -> Vec<InFlight> {
        let stale: Vec<(PieceId, NodeId)> = self
            .in_flight
            .iter()
            .filter(|((_, target), f)| {
                (f.handed_out && now.saturating_duration_since(f.since) > max_age) || !up(*target)
            })
            .map(|(&k, _)| k)
            .collect();
        let mut out = Vec::new();
        for key in stale {
            if let Some(f) = self.in_flight.remove(&key) {
                out.push(f);
            }
            if let Some(q) = self.outbox.get_mut(&key.1) {
                q.retain(|c| c.piece != key.0);
            }
        }
        out
    }

    pub fn report(&self, now: Instant) -> Redundancy {
        let mut r = self.last.clone();
        r.repairs_in_flight = self
            .in_flight
            .values()
            .filter(|f| f.copy.kind == CopyKind::Repair)
            .count() as u64;
        r.moves_in_flight = self.in_flight.len() as u64 - r.repairs_in_flight;
        r.repairs_done = self.repairs_done;
        r.moves_done = self.moves_done;
        r.scanned_ms_ago = self
            .scanned_at
            .map_or(u64::MAX, |t| now.saturating_duration_since(t).as_millis() as u64);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, liveness: Liveness, bytes: u64) -> NodeView {
        NodeView {
            id,
            liveness,
            draining: false,
            domain: format!("node:{id}"),
            takes_data: liveness == Liveness::Up,
            bytes,
            capacity: 1 << 40,
        }
    }

    fn chunk(ino: Ino, piece: PieceId, nodes: &[NodeId], replicas: u8) -> ChunkView {
        ChunkView {
            ino,
            chunk: 0,
            piece,
            len: 4096,
            nodes: nodes.to_vec(),
            replicas,
        }
    }

    fn plan(nodes: Vec<NodeView>, chunks: Vec<ChunkView>, busy: &Busy) -> Plan {
        let none = HashSet::new();
        let mut p = Planner::new(nodes, busy, 4, 10, &none);
        for c in chunks {
            p.chunk(c);
        }
        p.finish()
    }

    #[test]
    fn a_down_daemon_waits_out_the_grace_period_then_is_repaired_around() {
        let busy = Busy::default();
        let down = vec![
            node(1, Liveness::Up, 0),
            node(2, Liveness::Down, 0),
            node(3, Liveness::Up, 0),
        ];
        let p = plan(down, vec![chunk(10, 100, &[1, 2], 2)], &busy);
        assert!(p.copies.is_empty(), "no storm while a daemon may come back");
        assert_eq!(p.stats.under_replicated, 1);

        let dead = vec![
            node(1, Liveness::Up, 0),
            node(2, Liveness::Dead, 0),
            node(3, Liveness::Up, 0),
        ];
        let p = plan(dead, vec![chunk(10, 100, &[1, 2], 2)], &busy);
        assert_eq!(p.copies.len(), 1);
        assert_eq!(p.copies[0].target, 3);
        assert_eq!(p.copies[0].sources, vec![1]);
        assert_eq!(p.copies[0].kind, CopyKind::Repair);
    }

    #[test]
    fn no_copy_goes_where_a_deletion_of_that_piece_is_queued() {
        // Node 3 is the emptiest and came back from the dead, with a deletion of piece 100
        // still queued: a copy there would be deleted by it.
        let busy = Busy::default();
        let nodes = || {
            vec![
                node(1, Liveness::Up, 10 << 20),
                node(2, Liveness::Dead, 0),
                node(3, Liveness::Up, 0),
                node(4, Liveness::Up, 5 << 20),
            ]
        };
        let none = HashSet::new();
        let queued = |n: NodeId, p: PieceId| (n, p) == (3, 100);
        let mut p = Planner::new(nodes(), &busy, 4, 10, &none).with_queued_deletes(queued);
        p.chunk(chunk(10, 100, &[1, 2], 2));
        p.chunk(chunk(11, 101, &[1, 2], 2));
        let plan = p.finish();
        let target_of = |piece| plan.copies.iter().find(|c| c.piece == piece).map(|c| c.target);
        assert_eq!(target_of(100), Some(4), "not onto node 3");
        assert_eq!(target_of(101), Some(3), "other pieces still go to the emptiest");

        // Balancing never moves a piece back onto a daemon that is to delete it.
        let nodes = vec![node(1, Liveness::Up, 0), node(2, Liveness::Up, 0)];
        let mut p = Planner::new(nodes, &busy, 4, 10, &none).with_queued_deletes(|n, _| n == 2);
        for piece in 0..40 {
            let mut c = chunk(piece, piece, &[1], 1);
            c.len = 1 << 20;
            p.chunk(c);
        }
        let plan = p.finish();
        assert!(plan.copies.is_empty(), "{:?}", plan.copies);
    }

    #[test]
    fn most_endangered_pieces_are_repaired_first_within_the_rate_bound() {
        let busy = Busy::default();
        let nodes = vec![
            node(1, Liveness::Up, 0),
            node(2, Liveness::Dead, 0),
            node(3, Liveness::Dead, 0),
            node(4, Liveness::Up, 0),
            node(5, Liveness::Up, 0),
        ];
        let mut chunks: Vec<ChunkView> = (0..10).map(|i| chunk(20 + i, 200 + i, &[1, 4, 2], 3)).collect();
        chunks.push(chunk(99, 999, &[1, 2, 3], 3));
        let p = plan(nodes, chunks, &busy);
        assert_eq!(p.copies[0].piece, 999, "one copy left goes first");
        assert_eq!(p.copies[1].piece, 999);
        // Two targets (4 and 5) can take at most 4 copies each.
        assert!(p.copies.len() <= 8);
        let per_target = |t| p.copies.iter().filter(|c| c.target == t).count();
        assert!(per_target(4) <= 4 && per_target(5) <= 4);
    }

    #[test]
    fn enough_copies_trims_dead_and_surplus_ones() {
        let busy = Busy::default();
        let nodes = vec![
            node(1, Liveness::Up, 10),
            node(2, Liveness::Up, 20),
            node(3, Liveness::Dead, 0),
        ];
        let p = plan(nodes, vec![chunk(1, 5, &[1, 2, 3], 1)], &busy);
        let trimmed: Vec<NodeId> = p.trims.iter().map(|t| t.node).collect();
        assert_eq!(trimmed, vec![3, 2], "dead copy, then the fuller daemon's");
        assert!(p.copies.is_empty());
    }

    #[test]
    fn draining_copies_move_then_go() {
        let busy = Busy::default();
        let mut nodes = vec![node(1, Liveness::Up, 0), node(2, Liveness::Up, 0)];
        nodes[0].draining = true;
        nodes[0].takes_data = false;
        let p = plan(nodes.clone(), vec![chunk(1, 5, &[1], 1)], &busy);
        assert_eq!(p.copies.len(), 1);
        assert_eq!(p.copies[0].kind, CopyKind::Move { from: 1 });
        assert_eq!(p.copies[0].target, 2);
        let p = plan(nodes, vec![chunk(1, 5, &[1, 2], 1)], &busy);
        assert_eq!(p.trims.len(), 1);
        assert_eq!(p.trims[0].node, 1);
    }

    #[test]
    fn distinct_failure_domains_are_preferred() {
        let busy = Busy::default();
        let mut nodes = vec![
            node(1, Liveness::Up, 0),
            node(2, Liveness::Up, 0),
            node(3, Liveness::Up, 100),
        ];
        nodes[0].domain = "domain:a".into();
        nodes[1].domain = "domain:a".into();
        nodes[2].domain = "domain:b".into();
        let p = plan(nodes, vec![chunk(1, 5, &[1], 2)], &busy);
        assert_eq!(
            p.copies[0].target, 3,
            "the emptier daemon shares the only copy's domain"
        );
    }

    #[test]
    fn a_new_daemon_receives_moves_until_balanced() {
        let busy = Busy::default();
        let mut nodes = vec![
            node(1, Liveness::Up, 0),
            node(2, Liveness::Up, 0),
            node(3, Liveness::Up, 0),
        ];
        let mut chunks = Vec::new();
        for i in 0..300u64 {
            let n = (i % 2 + 1) as NodeId;
            let mut c = chunk(i + 1, i + 1, &[n], 1);
            c.len = 64 << 10;
            nodes[n as usize - 1].bytes += c.len;
            chunks.push(c);
        }
        let none = HashSet::new();
        let mut p = Planner::new(nodes, &busy, 1000, 10, &none);
        for c in chunks {
            p.chunk(c);
        }
        let plan = p.finish();
        let to_new = plan.copies.iter().filter(|c| c.target == 3).count();
        // 300 pieces of 64 KiB over three daemons: about 100 each.
        assert!((80..=100).contains(&to_new), "{to_new} moves to the new daemon");
        assert!(plan.copies.iter().all(|c| matches!(c.kind, CopyKind::Move { .. })));
    }

    #[test]
    fn lost_and_unavailable_are_counted() {
        let busy = Busy::default();
        let nodes = vec![node(1, Liveness::Down, 0), node(2, Liveness::Dead, 0)];
        let p = plan(nodes, vec![chunk(1, 5, &[1], 1), chunk(2, 6, &[2], 1)], &busy);
        assert_eq!(p.stats.unavailable, 2);
        assert_eq!(p.stats.lost, 1);
        assert_eq!(p.stats.under_replicated, 2);
    }
}
