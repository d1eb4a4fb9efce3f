//! Requests served by the metaserver: namespace, placement, sessions, storage daemon registry.

use serde::{Deserialize, Serialize};

use crate::call::service;
use crate::locks::{Conflict, LockKind, LockOwner, LockRange};
use crate::types::{Attr, FileKind, HandleId, Ino, NodeAddr, NodeId, NodeUsage, PieceId, SessionId, Timestamp};

service! {
    /// Everything a metaserver answers.
    MetaRequest {
        OpenSession => SessionInfo,
        KeepAlive => (),
        CloseSession => (),
        Lookup => Attr,
        GetAttr => Attr,
        ReadDir => DirPage,
        ReadLink => Vec<u8>,
        MakeNode => NewEntry,
        Create => Created,
        Open => Opened,
        Release => (),
        ReleaseHandles => (),
        SetAttr => Attr,
        Unlink => Changes,
        RemoveDir => Changes,
        Rename => Changes,
        Link => NewEntry,
        ChunkMap => ChunkMapReply,
        AllocatePiece => Allocation,
        AllocateCopy => Allocation,
        CommitWrite => Attr,
        RetractWrite => Attr,
        Deallocate => Attr,
        StatFs => FsStats,
        ClusterStatus => ClusterReport,
        RegisterNode => Registered,
        Heartbeat => HeartbeatReply,
        Inventory => InventoryReply,
        GetXattr => Vec<u8>,
        ListXattr => Vec<Vec<u8>>,
        SetXattr => Attr,
        RemoveXattr => Attr,
        SetLock => LockOutcome,
        TestLock => Option<Conflict>,
        Drain => NodeReport,
        ForgetNode => ForgottenNode,
        Backup => BackupSnapshot,
        BackupRead => Vec<u8>,
        SyncCreates => Vec<Ino>,
    }
}

/// A mount announces itself; after a metaserver restart it resumes with the files it holds open,
/// so that unlinked-but-open files are not reaped under it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OpenSession {
    pub client: String,
    pub resume: Option<SessionId>,
    /// Every open handle and the inode it is open on.
    pub open_files: Vec<(HandleId, Ino)>,
    /// Locks the mount holds (claimed again from a restarted metaserver), as (inode, owner
    /// within the session, pid, range).
    pub locks: Vec<(Ino, u64, u32, LockRange)>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SessionInfo {
    pub session: SessionId,
    /// The holds of the locks claimed again (`OpenSession::locks`), by inode: writes made
    /// under them are fenced with these (see [`Fence`]).
    pub holds: Vec<(Ino, u64)>,
    /// Size of the fixed chunks files are split into; constant for the life of a cluster.
    pub chunk_size: u64,
    /// How often the mount must renew its session.
    pub keepalive_ms: u32,
}

/// Renews a session. Fails with `ErrorKind::Stale` if the metaserver no longer knows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeepAlive {
    pub session: SessionId,
}

/// Ends a session (a clean unmount): its open files are released at once.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CloseSession {
    pub session: SessionId,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Lookup {
    pub parent: Ino,
    pub name: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct GetAttr {
    pub ino: Ino,
}

/// One page of a directory, in name order, starting after `after`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadDir {
    pub dir: Ino,
    pub after: Option<Vec<u8>>,
    pub limit: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DirPage {
    pub entries: Vec<DirEntry>,
    /// More entries follow the last one returned.
    pub more: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadLink {
    pub ino: Ino,
}

/// What an operation changed besides its own answer: the new attributes of every inode it
/// modified (the parent directory's mtime and link count, say) and the inodes it deleted. The
/// kernel re-checks exactly those; a mount answers from this instead of asking again.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub changed: Vec<Attr>,
    pub removed: Vec<Ino>,
}

/// A new directory entry and what creating it changed.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NewEntry {
    pub attr: Attr,
    pub changes: Changes,
}

/// Creates a directory, symlink, device node, fifo or socket (anything without data pieces).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct MakeNode {
    pub parent: Ino,
    pub name: Vec<u8>,
    pub kind: FileKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    /// Symlink target; empty for other kinds.
    pub target: Vec<u8>,
}

/// Creates (or, unless `exclusive`, opens) a regular file and registers the open.
///
/// Answered as soon as the metaserver applied it, before it is durable (its log is fdatasync'd
/// right after): the mount makes it durable at the file's close or fsync, by a `CommitWrite`
/// of its data or by [`SyncCreates`].
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Create {
    pub parent: Ino,
    pub name: Vec<u8>,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub exclusive: bool,
    pub session: SessionId,
    /// The mount's id for the open this create makes.
    pub handle: HandleId,
    /// Handles of this session closed since the last request, released first (at most
    /// [`MAX_RELEASE_BATCH`]): a mount busy creating files needs no release requests.
    pub released: Vec<(HandleId, Ino)>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Created {
    pub attr: Attr,
    /// False when an existing file was opened instead.
    pub created: bool,
    /// A piece for the file's first chunk, so that a small file needs no further placement call.
    pub first_piece: Option<Allocation>,
    pub changes: Changes,
    /// Another mount has the file open (see [`Opened::open_elsewhere`]).
    pub open_elsewhere: bool,
}

/// Registers an open handle (so the file outlives its last link until released).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Open {
    pub ino: Ino,
    pub session: SessionId,
    pub handle: HandleId,
    /// As in [`Create`].
    pub released: Vec<(HandleId, Ino)>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Opened {
    pub attr: Attr,
    /// Locations of the first chunks, saving a round trip for small files.
    pub chunks: Vec<ChunkLocation>,
    /// Another mount (session) has the file open: this mount then gives a writable open no
    /// page cache, so that no shared writable mapping exists on two mounts at once (each would
    /// write back its stale pages over the other's).
    pub open_elsewhere: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Release {
    pub ino: Ino,
    pub session: SessionId,
    pub handle: HandleId,
}

/// Makes durable the creates of these inodes (answered before they were durable: [`Create`]),
/// and answers those that no longer exist: lost when the metaserver stopped before its log had
/// them (their numbers are never given out again), or removed since.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SyncCreates {
    /// At most [`MAX_SYNC_CREATES`].
    pub inos: Vec<Ino>,
}

/// Most inodes in one [`SyncCreates`].
pub const MAX_SYNC_CREATES: usize = 1024;

/// Most handles in one [`ReleaseHandles`].
pub const MAX_RELEASE_BATCH: usize = 1024;

/// Several handles closed on a mount, released in one request (the mount queues its releases
/// and sends what gathered while the previous batch was on its way).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReleaseHandles {
    pub session: SessionId,
    /// At most [`MAX_RELEASE_BATCH`] (handle, inode) pairs.
    pub handles: Vec<(HandleId, Ino)>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// Attribute changes other than size; also carried by a `CommitWrite` when a mount held them
/// back while the file had uncommitted writes.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttrChanges {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

impl AttrChanges {
    pub fn is_empty(&self) -> bool {
        *self == AttrChanges::default()
    }

    /// Later changes override earlier ones, field by field.
    pub fn merge(&mut self, later: &AttrChanges) {
        self.perm = later.perm.or(self.perm);
        self.uid = later.uid.or(self.uid);
        self.gid = later.gid.or(self.gid);
        self.atime = later.atime.or(self.atime);
        self.mtime = later.mtime.or(self.mtime);
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SetAttr {
    pub ino: Ino,
    pub changes: AttrChanges,
    pub size: Option<u64>,
    pub ctime: Option<Timestamp>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Unlink {
    pub parent: Ino,
    pub name: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RemoveDir {
    pub parent: Ino,
    pub name: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    /// POSIX rename: atomically replaces an existing target.
    Replace,
    /// Fails with AlreadyExists if the target exists.
    NoReplace,
    /// Atomically swaps source and target (both must exist).
    Exchange,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Rename {
    pub parent: Ino,
    pub name: Vec<u8>,
    pub new_parent: Ino,
    pub new_name: Vec<u8>,
    pub mode: RenameMode,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Link {
    pub ino: Ino,
    pub new_parent: Ino,
    pub new_name: Vec<u8>,
}

/// Chunk locations travel in windows of this many chunks (an `Open` reply carries the first).
pub const CHUNK_WINDOW: u32 = 64;

/// Where one chunk of a file is stored.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    pub chunk: u64,
    pub piece: PieceId,
    /// Valid bytes in the piece; the rest of the chunk (up to the file size) reads as zeros.
    pub len: u64,
    /// The daemons holding a current copy, those believed up first. Every one of them holds
    /// exactly this piece (pieces are immutable), so any may serve a read.
    pub nodes: Vec<NodeAddr>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ChunkMap {
    pub ino: Ino,
    pub first: u64,
    pub count: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ChunkMapReply {
    pub attr: Attr,
    pub chunk_size: u64,
    /// Only chunks that hold data; missing chunks are holes.
    pub chunks: Vec<ChunkLocation>,
}

/// Asks for a new piece to write chunk `chunk` of `ino` into.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AllocatePiece {
    pub ino: Ino,
    pub chunk: u64,
    /// Daemons the client failed to reach; they are not chosen again.
    pub exclude: Vec<NodeId>,
}

/// Asks for a new piece for chunk `chunk` of `ino` that starts as a copy of the first `len`
/// bytes of chunk `src_chunk` of `src_ino` (`copy_file_range` of whole chunks): the daemons
/// holding the source make it from their own copies, so the bytes never cross the network.
/// The allocation names the source piece as its base; the client writes no segments.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AllocateCopy {
    pub ino: Ino,
    pub chunk: u64,
    pub src_ino: Ino,
    pub src_chunk: u64,
    pub len: u64,
    /// Daemons the client failed to reach; they are not chosen again.
    pub exclude: Vec<NodeId>,
}

/// An existing piece a new piece starts as a copy of (copy-on-write of a chunk).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasePiece {
    pub piece: PieceId,
    pub len: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Allocation {
    pub chunk: u64,
    pub piece: PieceId,
    /// The daemons that must each receive the whole piece (one per replica). With a base, each
    /// of them holds the base piece and copies it locally.
    pub nodes: Vec<NodeAddr>,
    pub base: Option<BasePiece>,
    /// Replicas the file should have; fewer `nodes` means the write starts under-replicated
    /// (not enough daemons up) and the metaserver repairs it later.
    pub replicas: u8,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WrittenPiece {
    pub chunk: u64,
    pub piece: PieceId,
    /// The daemons that reported the piece durable (at least one).
    pub nodes: Vec<NodeId>,
    pub len: u64,
}

/// Makes durable pieces part of the file (replacing what those chunks held before).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CommitWrite {
    pub ino: Ino,
    pub pieces: Vec<WrittenPiece>,
    /// The file is at least this long afterwards.
    pub min_size: u64,
    /// Attribute changes made while the writes were pending, applied after them.
    pub attrs: AttrChanges,
    /// Names this commit, so that a retry (its answer was lost) is answered as the first
    /// attempt was instead of being applied again.
    pub id: CommitId,
    /// The writes were made while this mount held a lock on the file: they are committed
    /// only if that lock is still held (not lost with an expired session meanwhile, in which
    /// case another mount may have taken the lock and written since).
    pub fence: Option<Fence>,
    /// The pieces are still being made durable (the mount commits while the daemons sync, and
    /// withdraws what did not become durable with a [`RetractWrite`] before its close
    /// returns). Refused with `ErrorKind::Busy` if a chunk named already holds a piece: one
    /// that could be replaced only by a piece known to be durable.
    pub pieces_in_flight: bool,
}

/// Withdraws copies named by a commit made with `pieces_in_flight` that did not become
/// durable: each is forgotten (and its deletion queued on its daemon); a chunk left without
/// copies is dropped (it reads as a hole). The size goes back to `size_before` if it is
/// still the one that commit set.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RetractWrite {
    pub ino: Ino,
    /// (chunk, piece, daemons whose copy failed). At most [`MAX_RETRACTED`].
    pub copies: Vec<(u64, PieceId, Vec<NodeId>)>,
    /// (the size the commit answered, the size before it).
    pub size: Option<(u64, u64)>,
}

/// Most chunks in one [`RetractWrite`].
pub const MAX_RETRACTED: usize = 4096;

/// A commit's name: the committing mount's id (random, for the life of the mount process)
/// and a sequence number.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitId {
    pub client: u64,
    pub seq: u64,
    /// Every commit of this client with a lower sequence number has been answered: the
    /// metaserver may forget them.
    pub settled_below: u64,
}

/// A lock held by a session on a file, as granted ([`LockOutcome::Granted`]).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub session: SessionId,
    pub hold: u64,
}

/// Drops chunks `first..=last` of a file (fallocate's hole punching, whole chunks): they read
/// as zeros and take no storage. The size does not change.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Deallocate {
    pub ino: Ino,
    pub first: u64,
    pub last: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StatFs {}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct FsStats {
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    pub inodes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClusterStatus {}

/// How the metaserver regards a storage daemon.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Up,
    /// Silent for longer than the heartbeat timeout: not used for new data; its copies still
    /// count until the grace period ends (a restart must not cause a repair storm).
    Down,
    /// Down for longer than the grace period: its copies no longer count and are re-made
    /// elsewhere.
    Dead,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeReport {
    pub node: NodeAddr,
    pub state: NodeState,
    /// Being emptied by `dfs drain`: takes no new data, its copies are moved elsewhere.
    pub draining: bool,
    /// Failure domain label (machine, rack); copies of a piece go to distinct domains.
    pub domain: Option<String>,
    /// Piece deletions queued for this daemon.
    pub pending_deletes: u64,
    /// Copies being made onto this daemon (repairs and moves).
    pub incoming_copies: u64,
    /// What the daemon itself last reported.
    pub usage: NodeUsage,
    /// Pieces the namespace references on this daemon.
    pub referenced_pieces: u64,
    pub referenced_bytes: u64,
    /// Milliseconds since the last heartbeat (None: never seen since the metaserver started).
    pub last_seen_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClusterReport {
    pub nodes: Vec<NodeReport>,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub chunk_size: u64,
    /// Pieces queued for deletion on daemons.
    pub pending_deletes: u64,
    /// Files unlinked while open, waiting for their last close.
    pub orphaned_files: u64,
    pub sessions: u64,
    /// Cluster default replication factor.
    pub replicas: u8,
    pub redundancy: Redundancy,
}

/// The state of the cluster's copies, as of the last scan (every few seconds).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Redundancy {
    /// Chunks with data.
    pub pieces: u64,
    /// Copies referenced (sum over pieces of their replica count).
    pub copies: u64,
    /// Pieces with fewer usable copies than their replication factor (copies on dead or
    /// draining daemons, or missing).
    pub under_replicated: u64,
    /// Pieces whose every copy is on a daemon that is not up: unreadable until one returns.
    pub unavailable: u64,
    /// Pieces with no copy left on any daemon that is not dead: lost unless a daemon returns.
    pub lost: u64,
    /// Copies being made to restore the replication factor.
    pub repairs_in_flight: u64,
    /// Copies being made to rebalance or drain (the old copy is deleted once the new one is
    /// recorded).
    pub moves_in_flight: u64,
    /// Repairs and moves completed since the metaserver started.
    pub repairs_done: u64,
    pub moves_done: u64,
    /// Milliseconds since the scan these numbers come from.
    pub scanned_ms_ago: u64,
    /// Storage daemons up whose holdings are not confirmed yet (since they registered, the
    /// metaserver has not had their inventory, or they have not checked the copies it lacked):
    /// until then a missing copy there would not be counted.
    pub unverified_daemons: u64,
}

/// `dfs drain NODE`: empty a daemon onto the others (or stop doing so).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Drain {
    pub node: String,
    pub cancel: bool,
}

/// `dfs node forget NODE`: remove a dead or drained storage daemon for good, with its
/// queued deletions and the copies it is still recorded with. Refused while it is up, or while
/// it holds the only copy of anything.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ForgetNode {
    pub node: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ForgottenNode {
    /// Copies it was still recorded with (others remain; the repair replaces these).
    pub copies_dropped: u64,
    /// Deletions that were queued for it.
    pub deletions_dropped: u64,
}

/// Starts a consistent snapshot of the metaserver's database.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Backup {}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BackupSnapshot {
    pub id: u64,
    pub len: u64,
}

/// Reads the next bytes of a snapshot (at most [`BACKUP_READ`]).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BackupRead {
    pub id: u64,
    pub offset: u64,
}

pub const BACKUP_READ: u32 = 1 << 20;

/// A storage daemon (re)joins the cluster.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RegisterNode {
    pub name: String,
    /// Address clients use to reach the daemon.
    pub addr: String,
    pub usage: NodeUsage,
    /// Failure domain label (machine, rack), if configured.
    pub domain: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Registered {
    pub node: NodeId,
    pub heartbeat_ms: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Heartbeat {
    pub node: NodeId,
    pub usage: NodeUsage,
    /// Pieces deleted since the last heartbeat, as asked.
    pub deleted: Vec<PieceId>,
    /// Copy orders finished since the last heartbeat.
    pub copied: Vec<CopyDone>,
    /// Pieces found damaged (checksum mismatch on a read or a scrub) since the last heartbeat.
    pub corrupt: Vec<PieceId>,
    /// Pieces found absent since the last heartbeat: asked for by a reader or a rewrite, or
    /// listed by the metaserver to check (`HeartbeatReply::check`). The metaserver drops the
    /// copies it recorded here (the repair re-makes them).
    pub missing: Vec<PieceId>,
    /// The last `HeartbeatReply::check_round` whose pieces were checked (their absent ones
    /// are in `missing`, of this heartbeat or an earlier one).
    pub checked_round: u64,
}

/// Make a copy of a piece on this daemon, reading it from one of `sources`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CopyOrder {
    pub piece: PieceId,
    pub len: u64,
    pub sources: Vec<NodeAddr>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CopyDone {
    pub piece: PieceId,
    /// The durable copy's length, or why it could not be made.
    pub outcome: Result<u64, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HeartbeatReply {
    /// Pieces the daemon must delete.
    pub delete: Vec<PieceId>,
    /// More deletions are queued: heartbeat again right away.
    pub more: bool,
    /// Copies to make (repairs, moves).
    pub copy: Vec<CopyOrder>,
    /// The metaserver has no inventory from this daemon since it started (it restarted
    /// between two heartbeats): send one.
    pub inventory_wanted: bool,
    /// Pieces the metaserver records here that the last inventory did not list: check each
    /// and report those absent in the next heartbeat (`Heartbeat::missing`).
    pub check: Vec<PieceId>,
    /// Names the `check` batch, confirmed by `Heartbeat::checked_round`.
    pub check_round: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPiece {
    pub piece: PieceId,
    pub len: u64,
    /// Seconds since the piece was written.
    pub age_secs: u64,
}

/// After (re)registering, a daemon lists what it holds, in batches.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Inventory {
    pub node: NodeId,
    pub pieces: Vec<StoredPiece>,
    pub last: bool,
}

/// Pieces nobody references (left by writes that never committed) are queued for deletion and
/// reach the daemon in its heartbeat replies, like every other deletion.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct InventoryReply {}

/// Most bytes in an extended attribute's name (as Linux: XATTR_NAME_MAX).
pub const MAX_XATTR_NAME: usize = 255;
/// Most bytes in one extended attribute's value (as Linux: XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 64 * 1024;
/// Most bytes the names of one inode's attributes may take, NUL-terminated (XATTR_LIST_MAX).
pub const MAX_XATTR_LIST: usize = 64 * 1024;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct GetXattr {
    pub ino: Ino,
    pub name: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ListXattr {
    pub ino: Ino,
}

/// What setxattr(2) flags ask for.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Set,
    /// XATTR_CREATE: fail with EEXIST if it exists.
    Create,
    /// XATTR_REPLACE: fail with ENODATA if it does not.
    Replace,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SetXattr {
    pub ino: Ino,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    pub mode: XattrMode,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RemoveXattr {
    pub ino: Ino,
    pub name: Vec<u8>,
}

/// Sets or clears a byte-range lock (fcntl F_SETLK/F_SETLKW, or flock) for the whole cluster.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SetLock {
    pub ino: Ino,
    pub owner: LockOwner,
    pub pid: u32,
    pub start: u64,
    /// Inclusive; `u64::MAX` for "to the end of the file".
    pub end: u64,
    pub kind: LockKind,
    /// How long the metaserver may hold the request waiting for a conflicting lock to go
    /// (0: answer at once). The mount asks again until its caller gives up.
    pub wait_ms: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// Granted; `hold` names the session's hold of locks on the file (the same while it keeps
    /// at least one lock there, a new one once it held none). Unlocks answer 0.
    Granted {
        hold: u64,
    },
    Conflict(Conflict),
}

/// F_GETLK: the lock that would stand in the way of this one, if any.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TestLock {
    pub ino: Ino,
    pub owner: LockOwner,
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
}
