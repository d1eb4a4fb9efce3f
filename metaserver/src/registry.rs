//! The live view of storage daemons: who is up, what they hold, where new data goes.
//!
//! Placement rule: among daemons that are up, not draining, not excluded and have room for a
//! chunk, pick the one storing the fewest bytes, then the fewest pieces (pieces being written
//! count too), so data spreads evenly as daemons join and as files arrive. The copies of one
//! piece go to distinct daemons, and to distinct failure domains while there are enough.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use dfs_proto::meta::{NodeReport, NodeState as Liveness};
use dfs_proto::types::{NodeAddr, NodeId, NodeUsage, PieceId};

use crate::db::Effects;

#[derive(Debug, Clone)]
pub struct NodeState {
    pub name: String,
    pub addr: String,
    pub domain: Option<String>,
    pub draining: bool,
    /// When the metaserver learned of it (load or first registration): the start of its
    /// silence if it never reports.
    pub known_since: Instant,
    pub inventoried: bool,
    pub last_seen: Option<Instant>,
    /// Known from the database but not heard from since the metaserver started: presumed up
    /// until then, so a metaserver restart does not fail reads while daemons reconnect.
    pub presumed_up_until: Option<Instant>,
    /// As last reported by the daemon.
    pub usage: NodeUsage,
    /// Pieces (and their bytes) the namespace references on this daemon.
    pub referenced_pieces: u64,
    pub referenced_bytes: u64,
    /// Pieces allocated here and not yet committed, and the bytes they are expected to take.
    pub pending_pieces: u64,
    pub pending_bytes: u64,
    /// Whether the last liveness check saw it up (for logging transitions).
    pub was_up: bool,
}

/// An allocation not yet committed: the daemons expected to receive a copy, and the bytes
/// each is expected to take.
#[derive(Debug)]
struct Pending {
    copies: Vec<(NodeId, u64)>,
    since: Instant,
}

#[derive(Debug)]
pub struct Registry {
    nodes: BTreeMap<NodeId, NodeState>,
    pending: HashMap<PieceId, Pending>,
    heartbeat_timeout: Duration,
    dead_after: Duration,
}

/// Why no daemon could be chosen, for the client and the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no storage daemon available: {registered} registered, {up} up, {with_room} of those with room, {excluded} unreachable from the client"
)]
pub struct NoDaemon {
    pub registered: usize,
    pub up: usize,
    pub with_room: usize,
    pub excluded: usize,
}

impl Registry {
    pub fn new(heartbeat_timeout: Duration) -> Self {
        Registry {
            nodes: BTreeMap::new(),
            pending: HashMap::new(),
            heartbeat_timeout,
            dead_after: Duration::from_secs(600),
        }
    }

    /// How long a daemon may be down before its copies stop counting.
    pub fn with_dead_after(mut self, dead_after: Duration) -> Self {
        self.dead_after = dead_after;
        self
    }

    /// Adds a daemon known from the database, presumed up for one heartbeat timeout.
    pub fn load(&mut self, id: NodeId, rec: &crate::schema::NodeRecord, now: Instant) {
        self.nodes.insert(
            id,
            NodeState {
                name: rec.name.clone(),
                addr: rec.addr.clone(),
                domain: rec.domain.clone(),
                draining: rec.draining,
                known_since: now,
                inventoried: false,
                last_seen: None,
                // Daemons reconnecting to a restarted metaserver may take a few seconds (QUIC
                // retransmission backoff); reads and placement wait for them meanwhile.
                presumed_up_until: Some(now + self.heartbeat_timeout.max(Duration::from_secs(10))),
                usage: NodeUsage::default(),
                referenced_pieces: 0,
                referenced_bytes: 0,
                pending_pieces: 0,
                pending_bytes: 0,
                was_up: false,
            },
        );
    }

    /// Forgets a daemon removed for good.
    pub fn remove(&mut self, id: NodeId) {
        self.nodes.remove(&id);
    }

    pub fn add_referenced(&mut self, id: NodeId, pieces: u64, bytes: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.referenced_pieces += pieces;
            n.referenced_bytes += bytes;
        }
    }

    pub fn registered(&mut self, id: NodeId, name: String, addr: String, usage: NodeUsage, now: Instant) {
        let node = self.nodes.entry(id).or_insert_with(|| NodeState {
            name: name.clone(),
            addr: addr.clone(),
            domain: None,
            draining: false,
            known_since: now,
            inventoried: false,
            last_seen: None,
            presumed_up_until: None,
            usage,
            referenced_pieces: 0,
            referenced_bytes: 0,
            pending_pieces: 0,
            pending_bytes: 0,
            was_up: false,
        });
        node.name = name;
        node.addr = addr;
        node.usage = usage;
        node.last_seen = Some(now);
    }

    /// Records a heartbeat; false if the daemon is unknown (it must register).
    pub fn heartbeat(&mut self, id: NodeId, usage: NodeUsage, now: Instant) -> bool {
        match self.nodes.get_mut(&id) {
            Some(n) => {
                n.usage = usage;
                n.last_seen = Some(now);
                true
            }
            _ => false,
        }
    }

    pub fn is_up(&self, id: NodeId, now: Instant) -> bool {
        self.nodes.get(&id).is_some_and(|n| self.up(n, now))
    }

    fn up(&self, n: &NodeState, now: Instant) -> bool {
        Self::is_alive(n, now, self.heartbeat_timeout)
    }

    fn is_alive(n: &NodeState, now: Instant, timeout: Duration) -> bool {
        match n.last_seen {
            Some(t) => now.saturating_duration_since(t) < timeout,
            None => n.presumed_up_until.is_some_and(|until| now < until),
        }
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeState> {
        self.nodes.get(&id)
    }

    /// Whether the daemon sent a complete inventory since the metaserver started (how pieces
    /// written but never committed before a crash are found).
    pub fn inventoried(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.inventoried)
    }

    pub fn set_inventoried(&mut self, id: NodeId, done: bool) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.inventoried = done;
        }
    }

    pub fn set_domain(&mut self, id: NodeId, domain: Option<String>) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.domain = domain;
        }
    }

    pub fn set_draining(&mut self, id: NodeId, draining: bool) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.draining = draining;
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.keys().copied()
    }

    /// Up, down (its copies still count), or dead (down longer than the grace period).
    pub fn liveness(&self, id: NodeId, now: Instant) -> Liveness {
        let Some(n) = self.nodes.get(&id) else {
            return Liveness::Dead;
        };
        if self.up(n, now) {
            return Liveness::Up;
        }
        let silent_since = n.last_seen.unwrap_or(n.known_since);
        if now.saturating_duration_since(silent_since) >= self.heartbeat_timeout + self.dead_after {
            Liveness::Dead
        } else {
            Liveness::Down
        }
    }

    /// The failure domain of a daemon: its label, or itself.
    pub fn domain(&self, id: NodeId) -> String {
        match self.nodes.get(&id).and_then(|n| n.domain.clone()) {
            Some(d) => format!("domain:{d}"),
            None => format!("node:{id}"),
        }
    }

    /// Whether new data (and copies) may go to this daemon.
    fn takes_data(&self, n: &NodeState, min_free: u64, now: Instant) -> bool {
        self.up(n, now) && n.last_seen.is_some() && !n.draining && n.usage.free_bytes >= min_free
    }

    /// Picks up to `count` distinct daemons for the copies of a new piece: least loaded first,
    /// each in a failure domain not yet used (by the chosen ones or `taken`, daemons already
    /// holding a copy), then any distinct daemon if there are not enough domains. Fails only if
    /// none can be chosen.
    pub fn choose_many(
        &self,
        count: usize,
        taken: &[NodeId],
        exclude: &[NodeId],
        min_free: u64,
        now: Instant,
    ) -> Result<Vec<NodeId>, NoDaemon> {
        let mut candidates: Vec<(u64, u64, NodeId)> = self
            .nodes
            .iter()
            .filter(|(id, n)| !exclude.contains(id) && !taken.contains(id) && self.takes_data(n, min_free, now))
            .map(|(&id, n)| {
                (
                    n.referenced_bytes + n.pending_bytes,
                    n.referenced_pieces + n.pending_pieces,
                    id,
                )
            })
            .collect();
        candidates.sort_unstable();
        let mut domains: Vec<String> = taken.iter().map(|&id| self.domain(id)).collect();
        let mut chosen: Vec<NodeId> = Vec::new();
        for &(_, _, id) in &candidates {
            if chosen.len() == count {
                break;
            }
            let d = self.domain(id);
            if !domains.contains(&d) {
                domains.push(d);
                chosen.push(id);
            }
        }
        for &(_, _, id) in &candidates {
            if chosen.len() == count {
                break;
            }
            if !chosen.contains(&id) {
                chosen.push(id);
            }
        }
        if chosen.is_empty() {
            let first = self.choose(exclude, min_free, now);
            return Err(first.err().unwrap_or(NoDaemon {
                registered: self.nodes.len(),
                up: 0,
                with_room: 0,
                excluded: exclude.len() + taken.len(),
            }));
        }
        Ok(chosen)
    }

    /// Bytes each daemon that takes data holds (committed plus expected), for balancing.
    pub fn loads(&self, now: Instant) -> Vec<(NodeId, u64, u64)> {
        self.nodes
            .iter()
            .filter(|(_, n)| self.takes_data(n, 0, now))
            .map(|(&id, n)| (id, n.referenced_bytes + n.pending_bytes, n.usage.capacity_bytes))
            .collect()
    }

    pub fn addr(&self, id: NodeId, now: Instant) -> NodeAddr {
        match self.nodes.get(&id) {
            Some(n) => NodeAddr {
                id,
                name: n.name.clone(),
                addr: n.addr.clone(),
                up: self.up(n, now),
            },
            None => NodeAddr {
                id,
                name: format!("node-{id}"),
                addr: String::new(),
                up: false,
            },
        }
    }

    /// Picks the daemon for a new piece of at most `min_free` bytes.
    pub fn choose(&self, exclude: &[NodeId], min_free: u64, now: Instant) -> Result<NodeId, NoDaemon> {
        let mut up = 0;
        let mut with_room = 0;
        let mut excluded = 0;
        let mut best: Option<(u64, u64, NodeId)> = None;
        for (&id, n) in &self.nodes {
            // Presumed-up daemons serve reads, but new data waits for real usage figures.
            if !self.up(n, now) || n.last_seen.is_none() || n.draining {
                continue;
            }
            up += 1;
            if n.usage.free_bytes < min_free {
                continue;
            }
            with_room += 1;
            if exclude.contains(&id) {
                excluded += 1;
                continue;
            }
            let key = (
                n.referenced_bytes + n.pending_bytes,
                n.referenced_pieces + n.pending_pieces,
                id,
            );
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best.map(|(_, _, id)| id).ok_or(NoDaemon {
            registered: self.nodes.len(),
            up,
            with_room,
            excluded,
        })
    }

    /// Whether some daemon is presumed up but has not reported since the metaserver started.
    pub fn awaiting_reports(&self, now: Instant) -> bool {
        self.nodes
            .values()
            .any(|n| n.last_seen.is_none() && n.presumed_up_until.is_some_and(|until| now < until))
    }

    /// Counts a copy of `piece` expected to take `bytes` on `node` once written (one call per
    /// copy of an allocation), so that a burst of allocations, e.g. the chunks of one large
    /// file, spreads before anything is committed.
    pub fn note_pending(&mut self, piece: PieceId, node: NodeId, bytes: u64, now: Instant) {
        let pending = self.pending.entry(piece).or_insert_with(|| Pending {
            copies: Vec::new(),
            since: now,
        });
        if pending.copies.iter().any(|&(n, _)| n == node) {
            return;
        }
        pending.copies.push((node, bytes));
        if let Some(n) = self.nodes.get_mut(&node) {
            n.pending_pieces += 1;
            n.pending_bytes += bytes;
        }
    }

    pub fn is_pending(&self, piece: PieceId) -> bool {
        self.pending.contains_key(&piece)
    }

    /// Forgets an allocation on every daemon it counted on (committed, or given up).
    fn clear_pending(&mut self, piece: PieceId) {
        let Some(p) = self.pending.remove(&piece) else { return };
        for (node, bytes) in p.copies {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.pending_pieces = n.pending_pieces.saturating_sub(1);
                n.pending_bytes = n.pending_bytes.saturating_sub(bytes);
            }
        }
    }

    /// Forgets allocations never committed within `max_age` (the client gave up).
    pub fn expire_pending(&mut self, now: Instant, max_age: Duration) {
        let stale: Vec<PieceId> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) > max_age)
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            self.clear_pending(id);
        }
    }

    pub fn apply(&mut self, effects: &Effects) {
        for &(node, piece, len) in &effects.pieces_added {
            self.clear_pending(piece);
            if let Some(n) = self.nodes.get_mut(&node) {
                n.referenced_pieces += 1;
                n.referenced_bytes += len;
            }
        }
        for &(node, _, len) in &effects.pieces_removed {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.referenced_pieces = n.referenced_pieces.saturating_sub(1);
                n.referenced_bytes = n.referenced_bytes.saturating_sub(len);
            }
        }
    }

    /// Capacity and free space over the daemons that are up.
    pub fn totals(&self, now: Instant) -> (u64, u64, u64) {
        self.nodes
            .values()
            .filter(|n| self.up(n, now))
            .fold((0u64, 0u64, 0u64), |(cap, free, used), n| {
                (
                    cap.saturating_add(n.usage.capacity_bytes),
                    free.saturating_add(n.usage.free_bytes),
                    used.saturating_add(n.usage.bytes),
                )
            })
    }

    pub fn report(&self, now: Instant) -> Vec<NodeReport> {
        self.nodes
            .iter()
            .map(|(&id, n)| NodeReport {
                node: self.addr(id, now),
                state: self.liveness(id, now),
                draining: n.draining,
                domain: n.domain.clone(),
                pending_deletes: 0,
                incoming_copies: 0,
                usage: n.usage,
                referenced_pieces: n.referenced_pieces,
                referenced_bytes: n.referenced_bytes,
                last_seen_ms: n.last_seen.map(|t| now.saturating_duration_since(t).as_millis() as u64),
            })
            .collect()
    }

    /// Daemons whose up/down state changed since the last call, with their new state.
    pub fn transitions(&mut self, now: Instant) -> Vec<(NodeAddr, bool, Option<Duration>)> {
        let timeout = self.heartbeat_timeout;
        let mut out = vec![];
        for (&id, n) in self.nodes.iter_mut() {
            let up = Self::is_alive(n, now, timeout);
            if up != n.was_up {
                n.was_up = up;
                out.push((
                    NodeAddr {
                        id,
                        name: n.name.clone(),
                        addr: n.addr.clone(),
                        up,
                    },
                    up,
                    n.last_seen.map(|t| now.saturating_duration_since(t)),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(free: u64) -> NodeUsage {
        NodeUsage {
            free_bytes: free,
            capacity_bytes: free,
            ..Default::default()
        }
    }

    fn registry(n: u32) -> (Registry, Instant) {
        let now = Instant::now();
        let mut r = Registry::new(Duration::from_secs(5));
        for id in 1..=n {
            r.registered(id, format!("s{id}"), format!("127.0.0.1:{id}"), usage(1 << 30), now);
        }
        (r, now)
    }

    fn commit(r: &mut Registry, node: NodeId, piece: PieceId, len: u64) {
        r.apply(&Effects {
            pieces_added: vec![(node, piece, len)],
            ..Default::default()
        });
    }

    #[test]
    fn equal_files_spread_round_robin() {
        let (mut r, now) = registry(3);
        let mut count = [0u32; 4];
        for piece in 0..999 {
            let node = r.choose(&[], 1, now).unwrap();
            r.note_pending(piece, node, 0, now);
            commit(&mut r, node, piece, 4096);
            count[node as usize] += 1;
        }
        assert_eq!(&count[1..], &[333, 333, 333]);
    }

    #[test]
    fn concurrent_allocations_spread_by_pending_pieces() {
        let (mut r, now) = registry(3);
        let picks: Vec<_> = (0..6)
            .map(|piece| {
                let node = r.choose(&[], 1, now).unwrap();
                r.note_pending(piece, node, 0, now);
                node
            })
            .collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn chunks_of_one_large_file_spread_before_commit() {
        let (mut r, now) = registry(3);
        commit(&mut r, 1, 100, 10);
        let picks: Vec<_> = (0..6)
            .map(|piece| {
                let node = r.choose(&[], 1, now).unwrap();
                r.note_pending(piece, node, 8 << 20, now);
                node
            })
            .collect();
        assert_eq!(picks, vec![2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn new_daemon_receives_new_data_until_balanced() {
        let (mut r, now) = registry(2);
        commit(&mut r, 1, 1, 1000);
        commit(&mut r, 2, 2, 1000);
        r.registered(3, "s3".into(), "x".into(), usage(1 << 30), now);
        assert_eq!(r.choose(&[], 1, now).unwrap(), 3);
    }

    #[test]
    fn down_full_and_excluded_daemons_are_skipped() {
        let (mut r, now) = registry(3);
        r.registered(2, "s2".into(), "x".into(), usage(10), now);
        assert_eq!(r.choose(&[1], 100, now).unwrap(), 3);
        let later = now + Duration::from_secs(6);
        r.heartbeat(3, usage(1 << 30), later);
        assert_eq!(r.choose(&[], 100, later).unwrap(), 3);
        let err = r.choose(&[3], 100, later).unwrap_err();
        assert_eq!(
            err,
            NoDaemon {
                registered: 3,
                up: 1,
                with_room: 1,
                excluded: 1
            }
        );
        assert!(Registry::new(Duration::from_secs(1)).choose(&[], 0, now).is_err());
    }

    #[test]
    fn daemons_known_from_before_a_restart_are_presumed_up_briefly() {
        let now = Instant::now();
        let mut r = Registry::new(Duration::from_secs(5));
        let rec = crate::schema::NodeRecord {
            name: "s1".into(),
            addr: "x".into(),
            domain: None,
            draining: false,
        };
        r.load(1, &rec, now);
        assert!(r.is_up(1, now + Duration::from_secs(4)));
        assert!(!r.is_up(1, now + Duration::from_secs(11)));
        assert_eq!(r.report(now)[0].last_seen_ms, None, "never heard from is shown as such");
    }

    #[test]
    fn pending_copies_of_one_piece_are_all_cleared_by_its_commit() {
        let (mut r, now) = registry(3);
        for node in [1, 2] {
            r.note_pending(7, node, 8 << 20, now);
        }
        r.note_pending(8, 3, 8 << 20, now);
        let pending = |r: &Registry, id| {
            let n = r.node(id).unwrap();
            (n.pending_pieces, n.pending_bytes)
        };
        assert_eq!(pending(&r, 1), (1, 8 << 20));
        assert_eq!(pending(&r, 2), (1, 8 << 20));
        // Committed with one of its two copies (the other failed): nothing is left pending.
        commit(&mut r, 1, 7, 100);
        assert_eq!(pending(&r, 1), (0, 0));
        assert_eq!(pending(&r, 2), (0, 0));
        assert_eq!(pending(&r, 3), (1, 8 << 20));
        r.expire_pending(now + Duration::from_secs(601), Duration::from_secs(600));
        assert_eq!(pending(&r, 3), (0, 0));
        assert!(!r.is_pending(8));
    }

    #[test]
    fn transitions_are_reported_once() {
        let (mut r, now) = registry(1);
        assert_eq!(r.transitions(now).len(), 1);
        assert!(r.transitions(now).is_empty());
        let later = now + Duration::from_secs(11);
        let t = r.transitions(later);
        assert_eq!(t.len(), 1);
        assert!(!t[0].1);
    }
}
