//! Namespace operations as plain functions over a transaction, so they can be unit-tested
//! without sockets.
//!
//! Write operations check everything that can fail for the caller before they change a table:
//! an operation that returns a filesystem error leaves no partial change behind (the committer
//! commits the other operations of the batch). The one deliberate exception is
//! [`commit_write`] on a vanished inode, which queues the orphaned pieces for deletion.

use std::ops::Bound;

use dfs_common::config::MAX_REPLICAS;
use dfs_proto::ErrorKind;
use dfs_proto::meta::{
    AttrChanges, CommitId, DirEntry, DirPage, MAX_XATTR_LIST, MAX_XATTR_NAME, MAX_XATTR_VALUE, RenameMode, SetAttr,
    TimeSet, WrittenPiece, XattrMode,
};
use dfs_proto::names::{MAX_SYMLINK_LEN, validate_name};
use dfs_proto::types::{Attr, FileKind, Ino, NodeId, PieceId, ROOT_INO};
use redb::ReadableTable;

use crate::db::{Tables, WriteCtx};
use crate::error::{MetaError, Result, not_found};
use crate::schema::{ChunkRecord, InodeRecord, NodeRecord, get_inode, keys};

const S_ISGID: u32 = 0o2000;
/// Most hard links one inode may have.
pub const MAX_LINKS: u32 = 65_000;
/// Most entries one readdir page returns (bounds the reply frame).
pub const MAX_DIR_PAGE: u32 = 2048;

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn fs_err(kind: ErrorKind, msg: impl Into<String>) -> MetaError {
    MetaError::fs(kind, msg)
}

// ----------------------------------------------------------------------------------------------
// Queries

pub fn inode(t: &impl Tables, ino: Ino) -> Result<InodeRecord> {
    get_inode(t.inodes(), ino)?.ok_or_else(|| not_found(format_args!("inode {ino}")))
}

pub fn directory(t: &impl Tables, ino: Ino) -> Result<InodeRecord> {
    let rec = inode(t, ino)?;
    if !rec.is_dir() {
        return Err(fs_err(
            ErrorKind::NotDirectory,
            format!("inode {ino} is not a directory"),
        ));
    }
    Ok(rec)
}

pub fn child(t: &impl Tables, parent: Ino, name: &[u8]) -> Result<Option<Ino>> {
    Ok(t.dirents().get((parent, name))?.map(|v| v.value()))
}

pub fn lookup(t: &impl Tables, parent: Ino, name: &[u8]) -> Result<Attr> {
    validate_name(name)?;
    directory(t, parent)?;
    let ino =
        child(t, parent, name)?.ok_or_else(|| not_found(format_args!("{:?} in directory {parent}", show(name))))?;
    Ok(inode(t, ino)?.attr(ino))
}

pub fn get_attr(t: &impl Tables, ino: Ino) -> Result<Attr> {
    Ok(inode(t, ino)?.attr(ino))
}

pub fn read_link(t: &impl Tables, ino: Ino) -> Result<Vec<u8>> {
    let rec = inode(t, ino)?;
    if rec.kind != FileKind::Symlink {
        return Err(fs_err(
            ErrorKind::InvalidArgument,
            format!("inode {ino} is not a symlink"),
        ));
    }
    Ok(rec.target)
}

/// One page of `dir`, in name order, starting after `after`.
pub fn read_dir(t: &impl Tables, dir: Ino, after: Option<&[u8]>, limit: u32) -> Result<DirPage> {
    directory(t, dir)?;
    let limit = limit.clamp(1, MAX_DIR_PAGE) as usize;
    let start = match after {
        Some(a) => Bound::Excluded((dir, a)),
        None => Bound::Included((dir, &[][..])),
    };
    let end = Bound::Excluded((dir + 1, &[][..]));
    let mut entries = Vec::with_capacity(limit.min(256));
    let mut more = false;
    for item in t.dirents().range::<(u64, &[u8])>((start, end))? {
        let (key, value) = item?;
        if entries.len() == limit {
            more = true;
            break;
        }
        let ino = value.value();
        match get_inode(t.inodes(), ino)? {
            Some(rec) => entries.push(DirEntry {
                name: key.value().1.to_vec(),
                attr: rec.attr(ino),
            }),
            None => tracing::error!("directory {dir} names missing inode {ino}"),
        }
    }
    Ok(DirPage { entries, more })
}

/// The stored chunks of `ino` with index in `first..=last`.
pub fn chunk_range(t: &impl Tables, ino: Ino, first: u64, last: u64) -> Result<Vec<(u64, ChunkRecord)>> {
    let mut out = Vec::new();
    for item in t.chunks().range((ino, first)..=(ino, last))? {
        let (key, value) = item?;
        let index = key.value().1;
        out.push((index, ChunkRecord::decode(ino, index, value.value())?));
    }
    Ok(out)
}

pub fn chunk(t: &impl Tables, ino: Ino, index: u64) -> Result<Option<ChunkRecord>> {
    match t.chunks().get((ino, index))? {
        Some(v) => Ok(Some(ChunkRecord::decode(ino, index, v.value())?)),
        None => Ok(None),
    }
}

fn is_empty_dir(t: &impl Tables, ino: Ino) -> Result<bool> {
    Ok(t.dirents().range((ino, &[][..])..(ino + 1, &[][..]))?.next().is_none())
}

// ----------------------------------------------------------------------------------------------
// Writes

fn counter_for(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Directory => keys::DIRECTORIES,
        FileKind::Symlink => keys::SYMLINKS,
        _ => keys::FILES,
    }
}

fn alloc_ino(ctx: &mut WriteCtx<'_>) -> Result<Ino> {
    let next = crate::schema::get_counter(ctx.meta.table(), keys::NEXT_INO)?;
    ctx.meta.insert(keys::NEXT_INO, next + 1)?;
    Ok(next)
}

/// Applies link-count deltas and an mtime/ctime bump to a parent directory, and moves the
/// version of its entries (every change of a directory's entries comes through here, once per
/// directory and operation: mounts rely on that, `Attr::dir_version`).
fn touch_dir(ctx: &mut WriteCtx<'_>, dir: Ino, nlink_delta: i32) -> Result<()> {
    let mut rec = inode(ctx, dir)?;
    rec.nlink = rec.nlink.saturating_add_signed(nlink_delta);
    rec.size = rec.size.wrapping_add(1);
    rec.mtime = ctx.now;
    rec.ctime = ctx.now;
    ctx.put_inode(dir, &rec)
}

pub struct NewNode<'a> {
    pub parent: Ino,
    pub name: &'a [u8],
    pub kind: FileKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub target: &'a [u8],
}

pub fn make_node(ctx: &mut WriteCtx<'_>, n: &NewNode<'_>) -> Result<(Ino, InodeRecord)> {
    validate_name(n.name)?;
    if n.kind == FileKind::Symlink {
        if n.target.is_empty() {
            return Err(fs_err(ErrorKind::NotFound, "empty symlink target"));
        }
        if n.target.len() > MAX_SYMLINK_LEN {
            return Err(fs_err(
                ErrorKind::NameTooLong,
                format!("symlink target of {} bytes", n.target.len()),
            ));
        }
    }
    let parent = directory(ctx, n.parent)?;
    if child(ctx, n.parent, n.name)?.is_some() {
        return Err(fs_err(
            ErrorKind::AlreadyExists,
            format!("{:?} already exists in directory {}", show(n.name), n.parent),
        ));
    }
    let mut perm = n.perm & 0o7777;
    let mut gid = n.gid;
    if parent.perm & S_ISGID != 0 {
        gid = parent.gid;
        if n.kind == FileKind::Directory {
            perm |= S_ISGID;
        }
    }
    let ino = alloc_ino(ctx)?;
    let mut rec = InodeRecord::new(n.kind, perm, n.uid, gid, ctx.now);
    rec.rdev = n.rdev;
    if n.kind == FileKind::Symlink {
        rec.target = n.target.to_vec();
        rec.size = n.target.len() as u64;
    }
    if n.kind == FileKind::Directory {
        rec.parent = n.parent;
    }
    ctx.put_inode(ino, &rec)?;
    ctx.dirents.insert((n.parent, n.name), ino)?;
    // A directory's replication factor passes to what is created in it.
    if matches!(n.kind, FileKind::Directory | FileKind::RegularFile) {
        let inherited = ctx.xattrs.get((n.parent, REPLICAS_XATTR))?.map(|v| v.value().to_vec());
        if let Some(value) = inherited {
            ctx.xattrs.insert((ino, REPLICAS_XATTR), value.as_slice())?;
            rec.has_xattrs = true;
            ctx.put_inode(ino, &rec)?;
        }
    }
    touch_dir(ctx, n.parent, if n.kind == FileKind::Directory { 1 } else { 0 })?;
    ctx.add_counter(counter_for(n.kind), 1)?;
    Ok((ino, rec))
}

/// Creates a regular file, or returns the existing one (`false`) unless `exclusive`.
pub fn create_file(
    ctx: &mut WriteCtx<'_>,
    parent: Ino,
    name: &[u8],
    perm: u32,
    uid: u32,
    gid: u32,
    exclusive: bool,
) -> Result<(Attr, bool)> {
    validate_name(name)?;
    directory(ctx, parent)?;
    if let Some(existing) = child(ctx, parent, name)? {
        if exclusive {
            return Err(fs_err(
                ErrorKind::AlreadyExists,
                format!("{:?} already exists in directory {parent}", show(name)),
            ));
        }
        let rec = inode(ctx, existing)?;
        if rec.is_dir() {
            return Err(fs_err(
                ErrorKind::IsDirectory,
                format!("{:?} is a directory", show(name)),
            ));
        }
        return Ok((rec.attr(existing), false));
    }
    let (ino, rec) = make_node(
        ctx,
        &NewNode {
            parent,
            name,
            kind: FileKind::RegularFile,
            perm,
            uid,
            gid,
            rdev: 0,
            target: &[],
        },
    )?;
    Ok((rec.attr(ino), true))
}

/// Removes one link. An inode left without links is deleted at once if no mount has it open,
/// else it becomes an orphan that the reaper deletes after its last close.
fn drop_link(ctx: &mut WriteCtx<'_>, ino: Ino, mut rec: InodeRecord) -> Result<()> {
    rec.nlink = rec.nlink.saturating_sub(1);
    rec.ctime = ctx.now;
    if rec.nlink > 0 {
        return ctx.put_inode(ino, &rec);
    }
    ctx.add_counter(counter_for(rec.kind), -1)?;
    if (ctx.may_delete)(ino) {
        return delete_inode(ctx, ino, rec);
    }
    ctx.orphans.insert(ino, ())?;
    ctx.effects.orphaned = true;
    ctx.put_inode(ino, &rec)
}

/// Deletes an inode without links and queues its pieces for deletion.
fn delete_inode(ctx: &mut WriteCtx<'_>, ino: Ino, mut rec: InodeRecord) -> Result<()> {
    remove_chunks_from(ctx, ino, &mut rec, 0)?;
    ctx.remove_inode(ino)?;
    Ok(())
}

pub fn unlink(ctx: &mut WriteCtx<'_>, parent: Ino, name: &[u8]) -> Result<()> {
    validate_name(name)?;
    directory(ctx, parent)?;
    let ino =
        child(ctx, parent, name)?.ok_or_else(|| not_found(format_args!("{:?} in directory {parent}", show(name))))?;
    let rec = inode(ctx, ino)?;
    if rec.is_dir() {
        return Err(fs_err(
            ErrorKind::IsDirectory,
            format!("{:?} is a directory", show(name)),
        ));
    }
    ctx.dirents.remove((parent, name))?;
    touch_dir(ctx, parent, 0)?;
    drop_link(ctx, ino, rec)
}

pub fn remove_dir(ctx: &mut WriteCtx<'_>, parent: Ino, name: &[u8]) -> Result<()> {
    if name == b".." {
        return Err(fs_err(ErrorKind::NotEmpty, "cannot remove '..'"));
    }
    validate_name(name)?;
    directory(ctx, parent)?;
    let ino =
        child(ctx, parent, name)?.ok_or_else(|| not_found(format_args!("{:?} in directory {parent}", show(name))))?;
    let rec = inode(ctx, ino)?;
    if !rec.is_dir() {
        return Err(fs_err(
            ErrorKind::NotDirectory,
            format!("{:?} is not a directory", show(name)),
        ));
    }
    if !is_empty_dir(ctx, ino)? {
        return Err(fs_err(
            ErrorKind::NotEmpty,
            format!("directory {:?} is not empty", show(name)),
        ));
    }
    ctx.dirents.remove((parent, name))?;
    ctx.remove_inode(ino)?;
    touch_dir(ctx, parent, -1)?;
    ctx.add_counter(keys::DIRECTORIES, -1)
}

/// Fails if `dir` is `moved` or lies inside it (a directory cannot move into itself).
fn check_not_inside(ctx: &WriteCtx<'_>, moved: Ino, mut dir: Ino) -> Result<()> {
    loop {
        if dir == moved {
            return Err(fs_err(
                ErrorKind::InvalidArgument,
                format!("cannot move directory {moved} inside itself"),
            ));
        }
        if dir == ROOT_INO {
            return Ok(());
        }
        dir = inode(ctx, dir)?.parent;
    }
}

pub fn rename(
    ctx: &mut WriteCtx<'_>,
    parent: Ino,
    name: &[u8],
    new_parent: Ino,
    new_name: &[u8],
    mode: RenameMode,
) -> Result<()> {
    validate_name(name)?;
    validate_name(new_name)?;
    directory(ctx, parent)?;
    directory(ctx, new_parent)?;
    let src_ino =
        child(ctx, parent, name)?.ok_or_else(|| not_found(format_args!("{:?} in directory {parent}", show(name))))?;
    let mut src = inode(ctx, src_ino)?;
    let dst_ino = child(ctx, new_parent, new_name)?;
    if parent == new_parent && name == new_name {
        return Ok(());
    }
    if src.is_dir() && parent != new_parent {
        check_not_inside(ctx, src_ino, new_parent)?;
    }
    let moved_dir_delta = if src.is_dir() && parent != new_parent { 1 } else { 0 };
    let mut replaced_dir = false;
    match (mode, dst_ino) {
        (RenameMode::NoReplace, Some(_)) => {
            return Err(fs_err(
                ErrorKind::AlreadyExists,
                format!("{:?} already exists in directory {new_parent}", show(new_name)),
            ));
        }
        (RenameMode::Exchange, None) => {
            return Err(not_found(format_args!(
                "{:?} in directory {new_parent}",
                show(new_name)
            )));
        }
        (RenameMode::Exchange, Some(dst_ino)) => {
            return exchange(ctx, (parent, name, src_ino, src), (new_parent, new_name, dst_ino));
        }
        (_, Some(dst_ino)) if dst_ino == src_ino => return Ok(()),
        (_, Some(dst_ino)) => {
            let dst = inode(ctx, dst_ino)?;
            if src.is_dir() {
                if !dst.is_dir() {
                    return Err(fs_err(
                        ErrorKind::NotDirectory,
                        format!("{:?} is not a directory", show(new_name)),
                    ));
                }
                if !is_empty_dir(ctx, dst_ino)? {
                    return Err(fs_err(
                        ErrorKind::NotEmpty,
                        format!("directory {:?} is not empty", show(new_name)),
                    ));
                }
            } else if dst.is_dir() {
                return Err(fs_err(
                    ErrorKind::IsDirectory,
                    format!("{:?} is a directory", show(new_name)),
                ));
            }
            if dst.is_dir() {
                ctx.remove_inode(dst_ino)?;
                ctx.add_counter(keys::DIRECTORIES, -1)?;
                replaced_dir = true;
            } else {
                drop_link(ctx, dst_ino, dst)?;
            }
        }
        (_, None) => {}
    }
    ctx.dirents.remove((parent, name))?;
    ctx.dirents.insert((new_parent, new_name), src_ino)?;
    src.ctime = ctx.now;
    if src.is_dir() {
        src.parent = new_parent;
    }
    ctx.put_inode(src_ino, &src)?;
    let replaced_delta = if replaced_dir { -1 } else { 0 };
    if parent == new_parent {
        touch_dir(ctx, parent, replaced_delta)?;
    } else {
        touch_dir(ctx, parent, -moved_dir_delta)?;
        touch_dir(ctx, new_parent, moved_dir_delta + replaced_delta)?;
    }
    Ok(())
}

fn exchange(
    ctx: &mut WriteCtx<'_>,
    (parent, name, a_ino, mut a): (Ino, &[u8], Ino, InodeRecord),
    (new_parent, new_name, b_ino): (Ino, &[u8], Ino),
) -> Result<()> {
    if a_ino == b_ino {
        return Ok(());
    }
    let mut b = inode(ctx, b_ino)?;
    if parent != new_parent {
        if a.is_dir() {
            check_not_inside(ctx, a_ino, new_parent)?;
        }
        if b.is_dir() {
            check_not_inside(ctx, b_ino, parent)?;
        }
    }
    ctx.dirents.insert((parent, name), b_ino)?;
    ctx.dirents.insert((new_parent, new_name), a_ino)?;
    a.ctime = ctx.now;
    b.ctime = ctx.now;
    if a.is_dir() {
        a.parent = new_parent;
    }
    if b.is_dir() {
        b.parent = parent;
    }
    ctx.put_inode(a_ino, &a)?;
    ctx.put_inode(b_ino, &b)?;
    if parent == new_parent {
        touch_dir(ctx, parent, 0)
    } else {
        let delta = a.is_dir() as i32 - b.is_dir() as i32;
        touch_dir(ctx, parent, -delta)?;
        touch_dir(ctx, new_parent, delta)
    }
}

pub fn link(ctx: &mut WriteCtx<'_>, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr> {
    validate_name(new_name)?;
    let mut rec = inode(ctx, ino)?;
    if rec.is_dir() {
        return Err(fs_err(ErrorKind::NotPermitted, format!("inode {ino} is a directory")));
    }
    if rec.nlink == 0 {
        return Err(not_found(format_args!("inode {ino} (unlinked)")));
    }
    if rec.nlink >= MAX_LINKS {
        return Err(fs_err(
            ErrorKind::TooManyLinks,
            format!("inode {ino} has {} links", rec.nlink),
        ));
    }
    directory(ctx, new_parent)?;
    if child(ctx, new_parent, new_name)?.is_some() {
        return Err(fs_err(
            ErrorKind::AlreadyExists,
            format!("{:?} already exists in directory {new_parent}", show(new_name)),
        ));
    }
    ctx.dirents.insert((new_parent, new_name), ino)?;
    rec.nlink += 1;
    rec.ctime = ctx.now;
    ctx.put_inode(ino, &rec)?;
    touch_dir(ctx, new_parent, 0)?;
    Ok(rec.attr(ino))
}

/// Stops referencing a piece and queues its deletion on every daemon holding a copy.
fn release_piece(ctx: &mut WriteCtx<'_>, c: &ChunkRecord) -> Result<()> {
    for &node in &c.nodes {
        drop_copy(ctx, node, c.piece, c.len)?;
    }
    Ok(())
}

/// Forgets the copy of `piece` on `node` and queues its deletion there.
pub fn drop_copy(ctx: &mut WriteCtx<'_>, node: NodeId, piece: PieceId, len: u64) -> Result<()> {
    ctx.node_pieces.remove((node, piece))?;
    ctx.deletes.insert((node, piece), ())?;
    ctx.effects.pieces_removed.push((node, piece, len));
    Ok(())
}

/// Records a copy of a chunk's piece on `node`.
fn add_copy(ctx: &mut WriteCtx<'_>, node: NodeId, ino: Ino, index: u64, piece: PieceId, len: u64) -> Result<()> {
    ctx.node_pieces.insert((node, piece), (ino, index, len))?;
    ctx.effects.pieces_added.push((node, piece, len));
    Ok(())
}

pub fn put_chunk(ctx: &mut WriteCtx<'_>, ino: Ino, index: u64, c: &ChunkRecord) -> Result<()> {
    ctx.chunks.insert((ino, index), c.encode().as_slice())?;
    Ok(())
}

/// Drops every chunk of `ino` from index `first` on.
fn remove_chunks_from(ctx: &mut WriteCtx<'_>, ino: Ino, rec: &mut InodeRecord, first: u64) -> Result<()> {
    remove_chunks(ctx, ino, rec, first, u64::MAX)
}

/// Drops the chunks of `ino` with index in `first..=last` (their pieces queued for deletion).
fn remove_chunks(ctx: &mut WriteCtx<'_>, ino: Ino, rec: &mut InodeRecord, first: u64, last: u64) -> Result<()> {
    let doomed = chunk_range(ctx, ino, first, last)?;
    for (index, c) in doomed {
        ctx.chunks.remove((ino, index))?;
        release_piece(ctx, &c)?;
        rec.stored_bytes = rec.stored_bytes.saturating_sub(c.len);
    }
    Ok(())
}

fn truncate(ctx: &mut WriteCtx<'_>, ino: Ino, rec: &mut InodeRecord, size: u64, chunk_size: u64) -> Result<()> {
    remove_chunks_from(ctx, ino, rec, size.div_ceil(chunk_size))?;
    let keep = size % chunk_size;
    if keep != 0 {
        let index = size / chunk_size;
        if let Some(mut c) = chunk(ctx, ino, index)?
            && c.len > keep
        {
            for &node in &c.nodes {
                ctx.effects.pieces_removed.push((node, c.piece, c.len));
                ctx.effects.pieces_added.push((node, c.piece, keep));
                ctx.node_pieces.insert((node, c.piece), (ino, index, keep))?;
            }
            rec.stored_bytes = rec.stored_bytes.saturating_sub(c.len - keep);
            c.len = keep;
            put_chunk(ctx, ino, index, &c)?;
        }
    }
    rec.size = size;
    Ok(())
}

/// Punches whole chunks `first..=last` out of a regular file (they read as zeros afterwards);
/// the size stays.
pub fn deallocate(ctx: &mut WriteCtx<'_>, ino: Ino, first: u64, last: u64) -> Result<Attr> {
    let mut rec = inode(ctx, ino)?;
    if rec.kind != FileKind::RegularFile {
        return Err(fs_err(
            ErrorKind::InvalidArgument,
            format!("inode {ino} is not a regular file"),
        ));
    }
    if first <= last {
        remove_chunks(ctx, ino, &mut rec, first, last)?;
    }
    rec.mtime = ctx.now;
    rec.ctime = ctx.now;
    ctx.put_inode(ino, &rec)?;
    Ok(rec.attr(ino))
}

/// Applies attribute changes; true if anything was set.
fn apply_changes(rec: &mut InodeRecord, c: &AttrChanges, now: dfs_proto::types::Timestamp) -> bool {
    let resolve = |t: TimeSet| match t {
        TimeSet::Now => now,
        TimeSet::At(ts) => ts,
    };
    if let Some(perm) = c.perm {
        rec.perm = perm & 0o7777;
    }
    if let Some(uid) = c.uid {
        rec.uid = uid;
    }
    if let Some(gid) = c.gid {
        rec.gid = gid;
    }
    if let Some(t) = c.atime {
        rec.atime = resolve(t);
    }
    if let Some(t) = c.mtime {
        rec.mtime = resolve(t);
    }
    !c.is_empty()
}

pub fn set_attr(ctx: &mut WriteCtx<'_>, req: &SetAttr, chunk_size: u64) -> Result<Attr> {
    let ino = req.ino;
    let mut rec = inode(ctx, ino)?;
    if req.size.is_some() {
        match rec.kind {
            FileKind::RegularFile => {}
            FileKind::Directory => return Err(fs_err(ErrorKind::IsDirectory, format!("inode {ino} is a directory"))),
            _ => {
                return Err(fs_err(
                    ErrorKind::InvalidArgument,
                    format!("inode {ino} is not a regular file"),
                ));
            }
        }
    }
    let mut changed = false;
    if let Some(size) = req.size {
        if size != rec.size {
            truncate(ctx, ino, &mut rec, size, chunk_size)?;
            rec.mtime = ctx.now;
        }
        changed = true;
    }
    changed |= apply_changes(&mut rec, &req.changes, ctx.now);
    if let Some(c) = req.ctime {
        rec.ctime = c;
    } else if changed {
        rec.ctime = ctx.now;
    }
    ctx.put_inode(ino, &rec)?;
    Ok(rec.attr(ino))
}

/// Makes durable pieces part of a file, replacing the pieces those chunks held.
pub fn commit_write(
    ctx: &mut WriteCtx<'_>,
    ino: Ino,
    pieces: &[WrittenPiece],
    min_size: u64,
    attrs: &AttrChanges,
    chunk_size: u64,
) -> Result<Attr> {
    for p in pieces {
        if p.nodes.is_empty() {
            return Err(fs_err(
                ErrorKind::InvalidArgument,
                format!("piece {} committed without a daemon holding it", p.piece),
            ));
        }
        // A piece already queued for deletion (unreferenced for too long, or replaced since a
        // first, unanswered attempt at this commit) must not be referenced again.
        for &node in &p.nodes {
            if ctx.deletes.get((node, p.piece))?.is_some() {
                return Err(fs_err(
                    ErrorKind::Stale,
                    format!("piece {} on node {node} was deleted before it was committed", p.piece),
                ));
            }
        }
        if p.len > chunk_size {
            return Err(fs_err(
                ErrorKind::InvalidArgument,
                format!(
                    "piece {} of {} bytes exceeds the chunk size {chunk_size}",
                    p.piece, p.len
                ),
            ));
        }
    }
    let mut rec = match get_inode(ctx.inodes.table(), ino)? {
        Some(rec) if rec.kind == FileKind::RegularFile => rec,
        found => {
            // The file is gone (or never was a file): its new pieces would be leaked.
            for p in pieces {
                for &node in &p.nodes {
                    ctx.deletes.insert((node, p.piece), ())?;
                }
            }
            return Err(match found {
                Some(_) => fs_err(ErrorKind::InvalidArgument, format!("inode {ino} is not a regular file")),
                None => not_found(format_args!("inode {ino}")),
            });
        }
    };
    for p in pieces {
        let old = chunk(ctx, ino, p.chunk)?;
        if old.as_ref().is_some_and(|o| o.piece == p.piece) {
            continue;
        }
        let mut nodes = p.nodes.clone();
        nodes.sort_unstable();
        nodes.dedup();
        for &node in &nodes {
            add_copy(ctx, node, ino, p.chunk, p.piece, p.len)?;
        }
        let record = ChunkRecord {
            piece: p.piece,
            len: p.len,
            nodes,
        };
        put_chunk(ctx, ino, p.chunk, &record)?;
        rec.stored_bytes += p.len;
        if let Some(o) = old {
            release_piece(ctx, &o)?;
            rec.stored_bytes = rec.stored_bytes.saturating_sub(o.len);
        }
    }
    rec.size = rec.size.max(min_size);
    rec.mtime = ctx.now;
    rec.ctime = ctx.now;
    // Changes made after the writes (utimens by tar or cp -p, chmod...) come last.
    apply_changes(&mut rec, attrs, ctx.now);
    ctx.put_inode(ino, &rec)?;
    Ok(rec.attr(ino))
}

/// Withdraws copies a commit named while they were still being made durable
/// (`CommitWrite::pieces_in_flight`) and that failed: each is forgotten and its deletion
/// queued (the daemon may hold part of it); a chunk left with no copy is dropped and reads as
/// a hole. A chunk holding another piece by now (rewritten since) is left alone. With
/// `size` = (the size that commit answered, the size before it), the file goes back to its
/// old size if nothing has changed it since.
pub fn retract_write(
    ctx: &mut WriteCtx<'_>,
    ino: Ino,
    copies: &[(u64, PieceId, Vec<NodeId>)],
    size: Option<(u64, u64)>,
) -> Result<Attr> {
    let mut rec = match get_inode(ctx.inodes.table(), ino)? {
        Some(rec) if rec.kind == FileKind::RegularFile => rec,
        Some(_) => {
            return Err(fs_err(
                ErrorKind::InvalidArgument,
                format!("inode {ino} is not a regular file"),
            ));
        }
        // Gone: its chunks went with it.
        None => return Err(not_found(format_args!("inode {ino}"))),
    };
    for (index, piece, failed) in copies {
        let Some(mut c) = chunk(ctx, ino, *index)?.filter(|c| c.piece == *piece) else {
            continue;
        };
        for &node in failed {
            if c.nodes.contains(&node) {
                c.nodes.retain(|&n| n != node);
                drop_copy(ctx, node, c.piece, c.len)?;
            }
        }
        if c.nodes.is_empty() {
            ctx.chunks.remove((ino, *index))?;
            rec.stored_bytes = rec.stored_bytes.saturating_sub(c.len);
        } else {
            put_chunk(ctx, ino, *index, &c)?;
        }
    }
    if let Some((committed, before)) = size
        && rec.size == committed
    {
        rec.size = before;
    }
    rec.ctime = ctx.now;
    ctx.put_inode(ino, &rec)?;
    Ok(rec.attr(ino))
}

/// How long the answer of a commit is kept for a retry (far beyond any request deadline).
pub const COMMIT_ANSWER_KEPT_SECS: u64 = 3600;

/// Pieces still being made durable (`CommitWrite::pieces_in_flight`) may only fill chunks
/// that hold nothing: if one of them fails, withdrawing it ([`retract_write`]) leaves the file
/// as it was, whereas a replaced piece would already be queued for deletion.
fn check_fills_empty_chunks(ctx: &WriteCtx<'_>, ino: Ino, pieces: &[WrittenPiece]) -> Result<()> {
    for p in pieces {
        if let Some(old) = chunk(ctx, ino, p.chunk)?.filter(|o| o.piece != p.piece) {
            return Err(fs_err(
                ErrorKind::Busy,
                format!(
                    "inode {ino}: chunk {} holds piece {}: it can be replaced only by a durable piece",
                    p.chunk, old.piece
                ),
            ));
        }
    }
    Ok(())
}

/// [`commit_write`] under the name `id`, applied once: a retry of a commit that was applied
/// (its answer lost) gets the first answer, instead of referencing pieces again that may have
/// been replaced and deleted since. `check` runs before a first attempt is applied (the
/// lock fence); answers the client has settled are forgotten. With `in_flight`, the pieces
/// may not be durable yet ([`check_fills_empty_chunks`]).
#[allow(clippy::too_many_arguments)]
pub fn commit_write_once(
    ctx: &mut WriteCtx<'_>,
    id: CommitId,
    check: impl FnOnce() -> Result<()>,
    ino: Ino,
    pieces: &[WrittenPiece],
    in_flight: bool,
    min_size: u64,
    attrs: &AttrChanges,
    chunk_size: u64,
) -> Result<Attr> {
    if id.client == 0 {
        // Unnamed (not from a mount): applied as it comes.
        check()?;
        if in_flight {
            check_fills_empty_chunks(ctx, ino, pieces)?;
        }
        return commit_write(ctx, ino, pieces, min_size, attrs, chunk_size);
    }
    if id.settled_below > 0 {
        let settled = (id.client, 0)..(id.client, id.settled_below.min(id.seq));
        ctx.commits.retain_in(settled, |_, _| false)?;
    }
    if let Some(v) = ctx.commits.get((id.client, id.seq))? {
        let (_, attr): (u64, Attr) = postcard::from_bytes(v.value()).map_err(|source| MetaError::Corrupt {
            what: format!("answer of commit {} of client {:#x}", id.seq, id.client),
            source,
        })?;
        return Ok(attr);
    }
    check()?;
    if in_flight {
        check_fills_empty_chunks(ctx, ino, pieces)?;
    }
    let attr = commit_write(ctx, ino, pieces, min_size, attrs, chunk_size)?;
    let answer = postcard::to_stdvec(&(ctx.now.secs.max(0) as u64, attr)).expect("answer serializes");
    ctx.commits.insert((id.client, id.seq), answer.as_slice())?;
    Ok(attr)
}

/// Forgets commit answers older than [`COMMIT_ANSWER_KEPT_SECS`] (of mounts that went away
/// without settling them); returns how many.
pub fn forget_old_commits(ctx: &mut WriteCtx<'_>) -> Result<u64> {
    let cutoff = (ctx.now.secs.max(0) as u64).saturating_sub(COMMIT_ANSWER_KEPT_SECS);
    let mut old = Vec::new();
    for item in ctx.commits.iter()? {
        let (key, value) = item?;
        let secs = postcard::from_bytes::<(u64, Attr)>(value.value())
            .map(|(s, _)| s)
            .unwrap_or(0);
        if secs < cutoff {
            old.push(key.value());
        }
    }
    for key in &old {
        ctx.commits.remove(*key)?;
    }
    Ok(old.len() as u64)
}

/// Deletes an orphaned inode and queues its pieces for deletion, unless a mount opened it
/// since (through `/proc/PID/fd`, say): the decision is the transaction's own (`may_delete`).
pub fn reap_orphan(ctx: &mut WriteCtx<'_>, ino: Ino) -> Result<()> {
    match get_inode(ctx.inodes.table(), ino)? {
        Some(rec) if rec.nlink == 0 => {
            if !(ctx.may_delete)(ino) {
                return Ok(());
            }
            ctx.orphans.remove(ino)?;
            delete_inode(ctx, ino, rec)
        }
        _ => {
            ctx.orphans.remove(ino)?;
            Ok(())
        }
    }
}

/// Records a storage daemon by name; returns its id (stable across restarts).
pub fn register_node(ctx: &mut WriteCtx<'_>, name: &str, addr: &str, domain: Option<&str>) -> Result<NodeId> {
    let mut max_id = 0;
    let mut found = None;
    for item in ctx.nodes.iter()? {
        let (id, value) = item?;
        let id = id.value();
        max_id = max_id.max(id);
        let rec = NodeRecord::decode(id, value.value())?;
        if rec.name == name {
            found = Some((id, rec));
        }
    }
    let record = NodeRecord {
        name: name.to_owned(),
        addr: addr.to_owned(),
        domain: domain.map(str::to_owned),
        draining: found.as_ref().is_some_and(|(_, r)| r.draining),
    };
    let id = match found {
        Some((id, existing)) if existing == record => return Ok(id),
        Some((id, _)) => id,
        None => {
            // Never the id of a daemon forgotten before: what is still known of it (in
            // memory, in logs) must not apply to a newcomer.
            let next = crate::schema::get_counter(ctx.meta.table(), keys::NEXT_NODE_ID)?.max(max_id as u64 + 1);
            ctx.meta.insert(keys::NEXT_NODE_ID, next + 1)?;
            u32::try_from(next).map_err(|_| fs_err(ErrorKind::NoSpace, "no storage daemon ids left"))?
        }
    };
    ctx.nodes.insert(id, record.encode().as_slice())?;
    Ok(id)
}

/// Marks a daemon as being drained (or no longer); returns its id.
pub fn set_draining(ctx: &mut WriteCtx<'_>, name: &str, draining: bool) -> Result<(NodeId, NodeRecord)> {
    let mut found = None;
    for item in ctx.nodes.iter()? {
        let (id, value) = item?;
        let rec = NodeRecord::decode(id.value(), value.value())?;
        if rec.name == name {
            found = Some((id.value(), rec));
            break;
        }
    }
    let Some((id, mut rec)) = found else {
        return Err(not_found(format_args!("storage daemon {name:?}")));
    };
    rec.draining = draining;
    ctx.nodes.insert(id, rec.encode().as_slice())?;
    Ok((id, rec))
}

/// A copy of `piece` was made on `node` (a repair or a move). Records it if the chunk still
/// holds that piece and returns true; otherwise queues the new copy for deletion (the chunk
/// was rewritten or the file deleted meanwhile). A move then drops the copy on `from`.
///
/// A copy on a daemon with a deletion of that piece queued is never recorded: the daemon may
/// be deleting it already (the queue entry goes only once it confirms), so recording it would
/// name a daemon about to lose it. The planner does not send copies there.
pub fn add_replica(
    ctx: &mut WriteCtx<'_>,
    ino: Ino,
    index: u64,
    piece: PieceId,
    node: NodeId,
    from: Option<NodeId>,
) -> Result<bool> {
    if ctx.deletes.get((node, piece))?.is_some() {
        return Ok(false);
    }
    let current = chunk(ctx, ino, index)?;
    let Some(mut c) = current.filter(|c| c.piece == piece) else {
        ctx.deletes.insert((node, piece), ())?;
        return Ok(false);
    };
    if !c.nodes.contains(&node) {
        c.nodes.push(node);
        add_copy(ctx, node, ino, index, piece, c.len)?;
    }
    if let Some(from) = from
        && from != node
        && c.nodes.contains(&from)
    {
        c.nodes.retain(|&n| n != from);
        drop_copy(ctx, from, piece, c.len)?;
    }
    put_chunk(ctx, ino, index, &c)?;
    Ok(true)
}

/// Drops the copy of a chunk's piece on `node` (damaged, surplus, or on a dead or drained
/// daemon), never the last copy. Returns whether it was dropped.
pub fn remove_replica(ctx: &mut WriteCtx<'_>, ino: Ino, index: u64, piece: PieceId, node: NodeId) -> Result<bool> {
    let Some(mut c) = chunk(ctx, ino, index)?.filter(|c| c.piece == piece) else {
        return Ok(false);
    };
    if !c.nodes.contains(&node) || c.nodes.len() < 2 {
        return Ok(false);
    }
    c.nodes.retain(|&n| n != node);
    drop_copy(ctx, node, piece, c.len)?;
    put_chunk(ctx, ino, index, &c)?;
    Ok(true)
}

/// Removes storage daemon `name` for good: the copies it is recorded with (each piece keeps
/// its other copies; one whose only copy is there makes this fail, changing nothing), its
/// queued deletions, and its record. Returns (id, copies dropped, deletions dropped).
pub fn forget_node(ctx: &mut WriteCtx<'_>, name: &str) -> Result<(NodeId, u64, u64)> {
    let mut found = None;
    for item in ctx.nodes.iter()? {
        let (id, value) = item?;
        if NodeRecord::decode(id.value(), value.value())?.name == name {
            found = Some(id.value());
            break;
        }
    }
    let id = found.ok_or_else(|| not_found(format_args!("storage daemon {name:?}")))?;
    let mut held = Vec::new();
    for item in ctx.node_pieces.range((id, 0)..=(id, u64::MAX))? {
        let (key, value) = item?;
        let (ino, chunk, _) = value.value();
        held.push((key.value().1, ino, chunk));
    }
    // Checked first: a refusal leaves everything as it was.
    let mut only_copies = 0u64;
    let mut example = None;
    for &(piece, ino, index) in &held {
        if chunk(ctx, ino, index)?.is_some_and(|c| c.piece == piece && c.nodes == [id]) {
            only_copies += 1;
            example.get_or_insert((piece, ino));
        }
    }
    if let Some((piece, ino)) = example {
        return Err(fs_err(
            ErrorKind::Busy,
            format!(
                "{only_copies} pieces have their only copy on {name} (e.g. piece {piece} of inode {ino}): \
                 bring it back and drain it (dfs drain {name}) first"
            ),
        ));
    }
    for &(piece, ino, index) in &held {
        ctx.node_pieces.remove((id, piece))?;
        if let Some(mut c) = chunk(ctx, ino, index)?.filter(|c| c.piece == piece) {
            c.nodes.retain(|&n| n != id);
            put_chunk(ctx, ino, index, &c)?;
        }
    }
    let mut deletions = 0u64;
    ctx.deletes.retain_in((id, 0)..=(id, u64::MAX), |_, _| {
        deletions += 1;
        false
    })?;
    ctx.nodes.remove(id)?;
    Ok((id, held.len() as u64, deletions))
}

pub fn ack_deletes(ctx: &mut WriteCtx<'_>, node: NodeId, pieces: &[u64]) -> Result<()> {
    for &p in pieces {
        ctx.deletes.remove((node, p))?;
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Extended attributes

/// Namespaces stored as opaque name/value pairs. `system.*` (ACLs and the like) would need the
/// kernel to interpret them, which dfs does not offer.
const XATTR_NAMESPACES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.contains(&0) {
        return Err(fs_err(ErrorKind::InvalidArgument, "empty or invalid attribute name"));
    }
    if name.len() > MAX_XATTR_NAME {
        return Err(fs_err(
            ErrorKind::OutOfRange,
            format!("attribute name of {} bytes (at most {MAX_XATTR_NAME})", name.len()),
        ));
    }
    if !XATTR_NAMESPACES
        .iter()
        .any(|ns| name.starts_with(ns) && name.len() > ns.len())
    {
        return Err(fs_err(
            ErrorKind::Unsupported,
            format!(
                "attribute {:?}: only user.*, trusted.* and security.* are stored",
                show(name)
            ),
        ));
    }
    Ok(())
}

pub fn get_xattr(t: &impl Tables, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
    inode(t, ino)?;
    check_xattr_name(name)?;
    match t.xattrs().get((ino, name))? {
        Some(v) => Ok(v.value().to_vec()),
        None => Err(fs_err(
            ErrorKind::NoAttribute,
            format!("inode {ino} has no attribute {:?}", show(name)),
        )),
    }
}

pub fn list_xattrs(t: &impl Tables, ino: Ino) -> Result<Vec<Vec<u8>>> {
    inode(t, ino)?;
    let mut names = Vec::new();
    for item in t.xattrs().range((ino, &[][..])..(ino + 1, &[][..]))? {
        names.push(item?.0.value().1.to_vec());
    }
    Ok(names)
}

/// The extended attribute holding a file's or directory's replication factor (an ASCII number).
pub const REPLICAS_XATTR: &[u8] = b"user.dfs.replicas";

/// Parses a `user.dfs.replicas` value.
pub fn parse_replicas(value: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let n: u8 = text.parse().ok()?;
    (1..=MAX_REPLICAS).contains(&n).then_some(n)
}

/// How many copies the chunks of `ino` should have.
pub fn replicas_of(t: &impl Tables, ino: Ino, default: u8) -> Result<u8> {
    Ok(match t.xattrs().get((ino, REPLICAS_XATTR))? {
        Some(v) => parse_replicas(v.value()).unwrap_or(default),
        None => default,
    })
}

pub fn set_xattr(ctx: &mut WriteCtx<'_>, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<Attr> {
    let mut rec = inode(ctx, ino)?;
    check_xattr_name(name)?;
    if name == REPLICAS_XATTR && parse_replicas(value).is_none() {
        return Err(fs_err(
            ErrorKind::InvalidArgument,
            format!(
                "{}: the replication factor must be a number from 1 to {MAX_REPLICAS}",
                show(REPLICAS_XATTR)
            ),
        ));
    }
    if value.len() > MAX_XATTR_VALUE {
        return Err(fs_err(
            ErrorKind::OutOfRange,
            format!("attribute value of {} bytes (at most {MAX_XATTR_VALUE})", value.len()),
        ));
    }
    let exists = ctx.xattrs.get((ino, name))?.is_some();
    match (mode, exists) {
        (XattrMode::Create, true) => {
            return Err(fs_err(
                ErrorKind::AlreadyExists,
                format!("inode {ino} already has attribute {:?}", show(name)),
            ));
        }
        (XattrMode::Replace, false) => {
            return Err(fs_err(
                ErrorKind::NoAttribute,
                format!("inode {ino} has no attribute {:?}", show(name)),
            ));
        }
        _ => {}
    }
    if !exists {
        // listxattr must be able to return every name in one reply.
        let listed: usize = list_xattrs(ctx, ino)?.iter().map(|n| n.len() + 1).sum();
        if listed + name.len() + 1 > MAX_XATTR_LIST {
            return Err(fs_err(
                ErrorKind::NoSpace,
                format!("inode {ino}: attribute names would exceed {MAX_XATTR_LIST} bytes"),
            ));
        }
    }
    ctx.xattrs.insert((ino, name), value)?;
    rec.has_xattrs = true;
    rec.ctime = ctx.now;
    ctx.put_inode(ino, &rec)?;
    Ok(rec.attr(ino))
}

pub fn remove_xattr(ctx: &mut WriteCtx<'_>, ino: Ino, name: &[u8]) -> Result<Attr> {
    let mut rec = inode(ctx, ino)?;
    check_xattr_name(name)?;
    if ctx.xattrs.remove((ino, name))?.is_none() {
        return Err(fs_err(
            ErrorKind::NoAttribute,
            format!("inode {ino} has no attribute {:?}", show(name)),
        ));
    }
    rec.has_xattrs = ctx.xattrs.range((ino, &[][..])..(ino + 1, &[][..]))?.next().is_some();
    rec.ctime = ctx.now;
    ctx.put_inode(ino, &rec)?;
    Ok(rec.attr(ino))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{self, ReadCtx};
    use redb::Database;

    const CS: u64 = 1 << 20;

    struct Fixture {
        _dir: tempfile::TempDir,
        db: Database,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let db = db::open(&dir.path().join("meta.redb"), CS).unwrap();
            Fixture { _dir: dir, db }
        }

        fn write<T>(&self, f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T>) -> Result<T> {
            let txn = self.db.begin_write().unwrap();
            let r = {
                let mut ctx = WriteCtx::open(&txn).unwrap();
                f(&mut ctx)
            };
            txn.commit().unwrap();
            r
        }

        /// A transaction in which no mount has any file open.
        fn write_closed<T>(&self, f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T>) -> Result<T> {
            let txn = self.db.begin_write().unwrap();
            let closed = |_| true;
            let r = {
                let mut ctx = WriteCtx::open_with(&txn, &closed).unwrap();
                f(&mut ctx)
            };
            txn.commit().unwrap();
            r
        }

        fn read(&self) -> ReadCtx {
            ReadCtx::begin(&self.db).unwrap()
        }

        fn mk(&self, parent: Ino, name: &str, kind: FileKind) -> Ino {
            self.write(|c| {
                make_node(
                    c,
                    &NewNode {
                        parent,
                        name: name.as_bytes(),
                        kind,
                        perm: 0o755,
                        uid: 1,
                        gid: 1,
                        rdev: 0,
                        target: b"target",
                    },
                )
            })
            .unwrap()
            .0
        }

        fn kind_of(&self, r: Result<impl Sized>) -> ErrorKind {
            r.err().expect("expected an error").kind()
        }
    }

    fn piece(chunk: u64, piece: u64, len: u64) -> WrittenPiece {
        WrittenPiece {
            chunk,
            piece,
            nodes: vec![1],
            len,
        }
    }

    #[test]
    fn create_lookup_and_nlink() {
        let f = Fixture::new();
        let d = f.mk(ROOT_INO, "d", FileKind::Directory);
        let _ = f.mk(d, "sub", FileKind::Directory);
        let file = f.mk(d, "file", FileKind::RegularFile);
        let r = f.read();
        assert_eq!(lookup(&r, d, b"file").unwrap().ino, file);
        assert_eq!(get_attr(&r, d).unwrap().nlink, 3);
        assert_eq!(get_attr(&r, ROOT_INO).unwrap().nlink, 3);
        assert_eq!(f.kind_of(lookup(&r, d, b"nope")), ErrorKind::NotFound);
        assert_eq!(f.kind_of(lookup(&r, file, b"x")), ErrorKind::NotDirectory);
        assert_eq!(f.kind_of(lookup(&r, d, &[b'x'; 256])), ErrorKind::NameTooLong);
        let dup = f.write(|c| create_file(c, d, b"file", 0o644, 0, 0, true));
        assert_eq!(f.kind_of(dup), ErrorKind::AlreadyExists);
        let (attr, created) = f.write(|c| create_file(c, d, b"file", 0o644, 0, 0, false)).unwrap();
        assert!(!created);
        assert_eq!(attr.ino, file);
    }

    #[test]
    fn every_change_of_a_directory_s_entries_moves_its_version_by_one() {
        let f = Fixture::new();
        let a = f.mk(ROOT_INO, "a", FileKind::Directory);
        let b = f.mk(ROOT_INO, "b", FileKind::Directory);
        let version = |d| get_attr(&f.read(), d).unwrap().dir_version;
        assert_eq!((version(a), version(b)), (0, 0), "a new directory");
        let file = f.mk(a, "f", FileKind::RegularFile);
        assert_eq!(version(a), 1);
        f.write(|c| create_file(c, a, b"g", 0o644, 0, 0, false)).unwrap();
        assert_eq!(version(a), 2);
        f.write(|c| create_file(c, a, b"g", 0o644, 0, 0, false)).unwrap();
        assert_eq!(version(a), 2, "opening an existing file changes no entry");
        f.write(|c| rename(c, a, b"g", a, b"h", RenameMode::Replace)).unwrap();
        assert_eq!(version(a), 3, "a rename within: one change");
        f.write(|c| rename(c, a, b"h", b, b"h", RenameMode::Replace)).unwrap();
        assert_eq!((version(a), version(b)), (4, 1), "a rename across: one change each");
        f.write(|c| link(c, file, b, b"f2")).unwrap();
        assert_eq!(version(b), 2);
        f.write(|c| unlink(c, b, b"f2")).unwrap();
        assert_eq!(version(b), 3);
        let _ = f.mk(b, "sub", FileKind::Directory);
        f.write(|c| remove_dir(c, b, b"sub")).unwrap();
        assert_eq!(version(b), 5);
        assert_eq!(get_attr(&f.read(), b).unwrap().size, 4096, "the size shown stays");
        assert_eq!(get_attr(&f.read(), file).unwrap().dir_version, 0, "files have none");
    }

    #[test]
    fn readdir_pages_in_name_order() {
        let f = Fixture::new();
        let d = f.mk(ROOT_INO, "d", FileKind::Directory);
        for i in (0..25).rev() {
            f.mk(d, &format!("f{i:02}"), FileKind::RegularFile);
        }
        let r = f.read();
        let mut names = vec![];
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = read_dir(&r, d, after.as_deref(), 10).unwrap();
            names.extend(page.entries.iter().map(|e| String::from_utf8(e.name.clone()).unwrap()));
            after = page.entries.last().map(|e| e.name.clone());
            if !page.more {
                break;
            }
        }
        let want: Vec<_> = (0..25).map(|i| format!("f{i:02}")).collect();
        assert_eq!(names, want);
        // Entries of a neighbouring directory never leak in.
        let e = f.mk(ROOT_INO, "e", FileKind::Directory);
        f.mk(e, "a", FileKind::RegularFile);
        assert_eq!(read_dir(&f.read(), d, None, 100).unwrap().entries.len(), 25);
    }

    #[test]
    fn unlink_orphans_and_reap_queues_deletes() {
        let f = Fixture::new();
        let file = f.mk(ROOT_INO, "f", FileKind::RegularFile);
        f.write(|c| {
            commit_write(
                c,
                file,
                &[piece(0, 10, 100), piece(1, 11, 50)],
                CS + 50,
                &AttrChanges::default(),
                CS,
            )
        })
        .unwrap();
        assert_eq!(get_attr(&f.read(), file).unwrap().stored_bytes, 150);
        f.write(|c| unlink(c, ROOT_INO, b"f")).unwrap();
        let r = f.read();
        assert!(r.orphans.get(file).unwrap().is_some());
        assert_eq!(get_attr(&r, file).unwrap().nlink, 0);
        drop(r);
        f.write(|c| reap_orphan(c, file)).unwrap();
        assert!(
            f.read().orphans.get(file).unwrap().is_some(),
            "opened again meanwhile: kept"
        );
        f.write_closed(|c| reap_orphan(c, file)).unwrap();
        let r = f.read();
        assert_eq!(f.kind_of(get_attr(&r, file)), ErrorKind::NotFound);
        let deletes: Vec<_> = r.deletes.iter().unwrap().map(|e| e.unwrap().0.value()).collect();
        assert_eq!(deletes, vec![(1, 10), (1, 11)]);
        assert_eq!(r.chunks.iter().unwrap().count(), 0);
        assert_eq!(r.node_pieces.iter().unwrap().count(), 0);
    }

    #[test]
    fn unlinking_a_closed_file_deletes_it_in_the_same_transaction() {
        let f = Fixture::new();
        let file = f.mk(ROOT_INO, "f", FileKind::RegularFile);
        f.write(|c| commit_write(c, file, &[piece(0, 10, 100)], 100, &AttrChanges::default(), CS))
            .unwrap();
        let txn = f.db.begin_write().unwrap();
        {
            let closed = |_| true;
            let mut ctx = WriteCtx::open_with(&txn, &closed).unwrap();
            unlink(&mut ctx, ROOT_INO, b"f").unwrap();
            assert!(!ctx.effects.orphaned);
        }
        txn.commit().unwrap();
        let r = f.read();
        assert!(r.orphans.get(file).unwrap().is_none());
        assert_eq!(f.kind_of(get_attr(&r, file)), ErrorKind::NotFound);
        assert!(r.deletes.get((1, 10)).unwrap().is_some());
    }

    #[test]
    fn commit_replaces_pieces_and_truncate_clamps() {
        let f = Fixture::new();
        let file = f.mk(ROOT_INO, "f", FileKind::RegularFile);
        f.write(|c| {
            commit_write(
                c,
                file,
                &[piece(0, 1, CS), piece(1, 2, CS), piece(2, 3, 10)],
                2 * CS + 10,
                &AttrChanges::default(),
                CS,
            )
        })
        .unwrap();
        f.write(|c| commit_write(c, file, &[piece(1, 4, CS)], 0, &AttrChanges::default(), CS))
            .unwrap();
        let r = f.read();
        assert_eq!(get_attr(&r, file).unwrap().size, 2 * CS + 10);
        assert!(r.deletes.get((1, 2)).unwrap().is_some());
        let set = SetAttr {
            ino: file,
            size: Some(CS + 5),
            ..Default::default()
        };
        // Changes carried by a commit land after the commit's own mtime update.
        let at = dfs_proto::types::Timestamp { secs: 1234, nanos: 5 };
        let changes = AttrChanges {
            perm: Some(0o600),
            mtime: Some(TimeSet::At(at)),
            ..Default::default()
        };
        let attr = f.write(|c| commit_write(c, file, &[], 0, &changes, CS)).unwrap();
        assert_eq!((attr.perm, attr.mtime), (0o600, at));
        let attr = f.write(|c| set_attr(c, &set, CS)).unwrap();
        assert_eq!(attr.size, CS + 5);
        assert_eq!(attr.stored_bytes, CS + 5);
        let r = f.read();
        let chunks = chunk_range(&r, file, 0, 9).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].1.len, 5);
        assert!(r.deletes.get((1, 3)).unwrap().is_some());
        // A piece queued for deletion cannot be committed (again).
        let again = f.write(|c| commit_write(c, file, &[piece(2, 3, 10)], 0, &AttrChanges::default(), CS));
        assert_eq!(f.kind_of(again), ErrorKind::Stale);
        // Commit to a vanished inode queues its pieces for deletion.
        let gone = f.write(|c| commit_write(c, 999, &[piece(0, 77, 1)], 1, &AttrChanges::default(), CS));
        assert_eq!(f.kind_of(gone), ErrorKind::NotFound);
        assert!(f.read().deletes.get((1, 77)).unwrap().is_some());
    }

    #[test]
    fn a_copy_is_not_recorded_where_its_deletion_is_queued() {
        let f = Fixture::new();
        let file = f.mk(ROOT_INO, "f", FileKind::RegularFile);
        f.write(|c| commit_write(c, file, &[piece(0, 10, 100)], 100, &AttrChanges::default(), CS))
            .unwrap();
        // Node 2 once held piece 10 and is to delete it (its copy was dropped while it was dead).
        f.write(|c| c.deletes.insert((2, 10), ()).map(|_| ()).map_err(Into::into))
            .unwrap();
        let kept = f.write(|c| add_replica(c, file, 0, 10, 2, Some(1))).unwrap();
        assert!(!kept, "a copy about to be deleted is not a copy");
        let r = f.read();
        assert_eq!(
            chunk(&r, file, 0).unwrap().unwrap().nodes,
            vec![1],
            "the move did not drop the source"
        );
        assert!(r.node_pieces.get((2, 10)).unwrap().is_none());
        assert!(r.deletes.get((2, 10)).unwrap().is_some(), "the queued deletion stays");
        // Once the deletion is confirmed, a new copy there counts.
        drop(r);
        f.write(|c| ack_deletes(c, 2, &[10])).unwrap();
        assert!(f.write(|c| add_replica(c, file, 0, 10, 2, Some(1))).unwrap());
        assert_eq!(chunk(&f.read(), file, 0).unwrap().unwrap().nodes, vec![2]);
    }

    #[test]
    fn pieces_in_flight_fill_only_empty_chunks_and_a_failed_one_is_withdrawn() {
        let f = Fixture::new();
        let file = f.mk(ROOT_INO, "f", FileKind::RegularFile);
        let id = |seq| CommitId {
            client: 1,
            seq,
            settled_below: 0,
        };
        let two = |chunk, p, len| WrittenPiece {
            chunk,
            piece: p,
            nodes: vec![1, 2],
            len,
        };
        let in_flight = |c: &mut WriteCtx<'_>, seq, pieces: &[WrittenPiece], size| {
            commit_write_once(
                c,
                id(seq),
                || Ok(()),
                file,
                pieces,
                true,
                size,
                &AttrChanges::default(),
                CS,
            )
        };
        // A new file: chunks 0 and 1 filled while their pieces are still being synced.
        let attr = f
            .write(|c| in_flight(c, 1, &[two(0, 10, CS), two(1, 11, 5)], CS + 5))
            .unwrap();
        assert_eq!(attr.size, CS + 5);
        // A chunk that holds a piece is replaced only by a durable one.
        let refused = f.write(|c| in_flight(c, 2, &[two(0, 12, CS)], CS));
        assert_eq!(f.kind_of(refused), ErrorKind::Busy);
        assert_eq!(chunk(&f.read(), file, 0).unwrap().unwrap().piece, 10);
        // Piece 11's copy on node 2 failed: withdrawn, the copy on node 1 stays.
        f.write(|c| retract_write(c, file, &[(1, 11, vec![2])], None)).unwrap();
        let r = f.read();
        assert_eq!(chunk(&r, file, 1).unwrap().unwrap().nodes, vec![1]);
        assert!(r.node_pieces.get((2, 11)).unwrap().is_none());
        assert!(r.deletes.get((2, 11)).unwrap().is_some(), "its remains are deleted");
        drop(r);
        // Both copies of both pieces failed: the file is as before the commit.
        let attr = f
            .write(|c| retract_write(c, file, &[(0, 10, vec![1, 2]), (1, 11, vec![1])], Some((CS + 5, 0))))
            .unwrap();
        assert_eq!(attr.size, 0);
        let r = f.read();
        assert!(chunk(&r, file, 0).unwrap().is_none());
        assert!(chunk(&r, file, 1).unwrap().is_none());
        for (node, p) in [(1, 10), (2, 10), (1, 11)] {
            assert!(r.node_pieces.get((node, p)).unwrap().is_none());
            assert!(r.deletes.get((node, p)).unwrap().is_some());
        }
        assert_eq!(get_inode(&r.inodes, file).unwrap().unwrap().stored_bytes, 0);
        drop(r);
        // A chunk rewritten since, and a size changed since, are left alone.
        f.write(|c| in_flight(c, 3, &[two(0, 13, 100)], 100)).unwrap();
        f.write(|c| commit_write(c, file, &[piece(0, 14, 200)], 200, &AttrChanges::default(), CS))
            .unwrap();
        let attr = f
            .write(|c| retract_write(c, file, &[(0, 13, vec![1, 2])], Some((100, 0))))
            .unwrap();
        assert_eq!(attr.size, 200);
        assert_eq!(chunk(&f.read(), file, 0).unwrap().unwrap().piece, 14);
    }

    #[test]
    fn a_retried_commit_is_answered_not_applied_again() {
        let f = Fixture::new();
        let file = f.mk(ROOT_INO, "f", FileKind::RegularFile);
        let id = |client, seq, settled_below| CommitId {
            client,
            seq,
            settled_below,
        };
        let ok = || Ok(());
        let commit = |c: &mut WriteCtx<'_>, id, p: WrittenPiece| {
            commit_write_once(c, id, ok, file, &[p], false, 100, &AttrChanges::default(), CS)
        };
        // Mount A commits piece 10; its answer is lost.
        let first = f.write(|c| commit(c, id(1, 7, 1), piece(0, 10, 100))).unwrap();
        // Mount B replaces the chunk; piece 10 is deleted and the deletion confirmed.
        f.write(|c| commit(c, id(2, 1, 1), piece(0, 20, 100))).unwrap();
        f.write(|c| ack_deletes(c, 1, &[10])).unwrap();
        assert!(f.read().deletes.get((1, 10)).unwrap().is_none());
        // A's retry gets the first answer and changes nothing.
        let again = f.write(|c| commit(c, id(1, 7, 1), piece(0, 10, 100))).unwrap();
        assert_eq!(again, first);
        let r = f.read();
        assert_eq!(
            chunk(&r, file, 0).unwrap().unwrap().piece,
            20,
            "the deleted piece is not referenced again"
        );
        assert!(r.node_pieces.get((1, 10)).unwrap().is_none());
        drop(r);
        // Settled answers are forgotten; a fence that fails stops a first attempt only.
        f.write(|c| commit(c, id(1, 8, 8), piece(0, 21, 100))).unwrap();
        assert!(f.read().commits.get((1, 7)).unwrap().is_none());
        let refused = f.write(|c| {
            commit_write_once(
                c,
                id(1, 9, 9),
                || Err(fs_err(ErrorKind::Stale, "lock lost")),
                file,
                &[piece(0, 22, 100)],
                false,
                100,
                &AttrChanges::default(),
                CS,
            )
        });
        assert_eq!(f.kind_of(refused), ErrorKind::Stale);
        assert_eq!(chunk(&f.read(), file, 0).unwrap().unwrap().piece, 21);
    }

    #[test]
    fn a_forgotten_daemon_takes_its_queue_and_copies_but_never_an_only_copy() {
        let f = Fixture::new();
        let a = f.write(|c| register_node(c, "storage-1", "x:1", None)).unwrap();
        let b = f.write(|c| register_node(c, "storage-2", "x:2", None)).unwrap();
        let file = f.mk(ROOT_INO, "f", FileKind::RegularFile);
        let both = WrittenPiece {
            chunk: 0,
            piece: 10,
            nodes: vec![a, b],
            len: 5,
        };
        let only_b = WrittenPiece {
            chunk: 1,
            piece: 11,
            nodes: vec![b],
            len: 5,
        };
        f.write(|c| commit_write(c, file, &[both, only_b], CS + 5, &AttrChanges::default(), CS))
            .unwrap();
        f.write(|c| c.deletes.insert((b, 99), ()).map(|_| ()).map_err(Into::into))
            .unwrap();
        let refused = f.write(|c| forget_node(c, "storage-2"));
        assert_eq!(f.kind_of(refused), ErrorKind::Busy);
        assert!(f.read().nodes.get(b).unwrap().is_some(), "nothing changed");
        // Once the only copy has a second one elsewhere, it can go.
        f.write(|c| add_replica(c, file, 1, 11, a, None)).unwrap();
        assert_eq!(f.write(|c| forget_node(c, "storage-2")).unwrap(), (b, 2, 1));
        let r = f.read();
        assert!(r.nodes.get(b).unwrap().is_none());
        assert_eq!(r.deletes.range((b, 0)..=(b, u64::MAX)).unwrap().count(), 0);
        assert_eq!(chunk(&r, file, 0).unwrap().unwrap().nodes, vec![a]);
        assert_eq!(chunk(&r, file, 1).unwrap().unwrap().nodes, vec![a]);
        assert_eq!(f.kind_of(f.write(|c| forget_node(c, "storage-2"))), ErrorKind::NotFound);
    }

    #[test]
    fn rename_rules() {
        let f = Fixture::new();
        let a = f.mk(ROOT_INO, "a", FileKind::Directory);
        let b = f.mk(a, "b", FileKind::Directory);
        let x = f.mk(ROOT_INO, "x", FileKind::RegularFile);
        let y = f.mk(ROOT_INO, "y", FileKind::RegularFile);
        // Into itself.
        let r = f.write(|c| rename(c, ROOT_INO, b"a", b, b"a2", RenameMode::Replace));
        assert_eq!(f.kind_of(r), ErrorKind::InvalidArgument);
        // File over file replaces atomically; the replaced inode becomes an orphan.
        f.write(|c| rename(c, ROOT_INO, b"x", ROOT_INO, b"y", RenameMode::Replace))
            .unwrap();
        let rd = f.read();
        assert_eq!(lookup(&rd, ROOT_INO, b"y").unwrap().ino, x);
        assert!(rd.orphans.get(y).unwrap().is_some());
        // NoReplace refuses, file over directory refuses, directory over non-empty refuses.
        let r = f.write(|c| rename(c, ROOT_INO, b"y", ROOT_INO, b"a", RenameMode::NoReplace));
        assert_eq!(f.kind_of(r), ErrorKind::AlreadyExists);
        let r = f.write(|c| rename(c, ROOT_INO, b"y", ROOT_INO, b"a", RenameMode::Replace));
        assert_eq!(f.kind_of(r), ErrorKind::IsDirectory);
        let c_dir = f.mk(ROOT_INO, "c", FileKind::Directory);
        let r = f.write(|c| rename(c, ROOT_INO, b"c", ROOT_INO, b"a", RenameMode::Replace));
        assert_eq!(f.kind_of(r), ErrorKind::NotEmpty);
        // Directory moves between parents fix both link counts and the parent pointer.
        f.write(|c| rename(c, a, b"b", c_dir, b"b", RenameMode::Replace))
            .unwrap();
        let rd = f.read();
        assert_eq!(get_attr(&rd, a).unwrap().nlink, 2);
        assert_eq!(get_attr(&rd, c_dir).unwrap().nlink, 3);
        assert_eq!(inode(&rd, b).unwrap().parent, c_dir);
        // Directory over an empty directory.
        f.write(|c| rename(c, ROOT_INO, b"c", ROOT_INO, b"a", RenameMode::Replace))
            .unwrap();
        let rd = f.read();
        assert_eq!(lookup(&rd, ROOT_INO, b"a").unwrap().ino, c_dir);
        assert_eq!(get_attr(&rd, ROOT_INO).unwrap().nlink, 3);
        // Exchange swaps.
        let z = f.mk(ROOT_INO, "z", FileKind::RegularFile);
        f.write(|c| rename(c, ROOT_INO, b"y", ROOT_INO, b"z", RenameMode::Exchange))
            .unwrap();
        let rd = f.read();
        assert_eq!(lookup(&rd, ROOT_INO, b"z").unwrap().ino, x);
        assert_eq!(lookup(&rd, ROOT_INO, b"y").unwrap().ino, z);
    }

    #[test]
    fn rmdir_and_links() {
        let f = Fixture::new();
        let d = f.mk(ROOT_INO, "d", FileKind::Directory);
        let file = f.mk(d, "f", FileKind::RegularFile);
        assert_eq!(
            f.kind_of(f.write(|c| remove_dir(c, ROOT_INO, b"d"))),
            ErrorKind::NotEmpty
        );
        assert_eq!(f.kind_of(f.write(|c| remove_dir(c, d, b"f"))), ErrorKind::NotDirectory);
        assert_eq!(
            f.kind_of(f.write(|c| unlink(c, ROOT_INO, b"d"))),
            ErrorKind::IsDirectory
        );
        let attr = f.write(|c| link(c, file, ROOT_INO, b"hard")).unwrap();
        assert_eq!(attr.nlink, 2);
        assert_eq!(
            f.kind_of(f.write(|c| link(c, d, ROOT_INO, b"dl"))),
            ErrorKind::NotPermitted
        );
        f.write(|c| unlink(c, d, b"f")).unwrap();
        let r = f.read();
        assert_eq!(get_attr(&r, file).unwrap().nlink, 1);
        assert!(r.orphans.get(file).unwrap().is_none());
        f.write(|c| remove_dir(c, ROOT_INO, b"d")).unwrap();
        assert_eq!(get_attr(&f.read(), ROOT_INO).unwrap().nlink, 2);
    }

    #[test]
    fn setgid_directories_pass_on_their_group() {
        let f = Fixture::new();
        let d = f.mk(ROOT_INO, "d", FileKind::Directory);
        f.write(|c| {
            set_attr(
                c,
                &SetAttr {
                    ino: d,
                    changes: AttrChanges {
                        perm: Some(0o2775),
                        gid: Some(42),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                CS,
            )
        })
        .unwrap();
        let sub = f.mk(d, "sub", FileKind::Directory);
        let file = f.mk(d, "file", FileKind::RegularFile);
        let r = f.read();
        assert_eq!(get_attr(&r, sub).unwrap().gid, 42);
        assert_eq!(get_attr(&r, sub).unwrap().perm & S_ISGID, S_ISGID);
        assert_eq!(get_attr(&r, file).unwrap().gid, 42);
    }

    #[test]
    fn nodes_keep_their_id_by_name() {
        let f = Fixture::new();
        let a = f.write(|c| register_node(c, "storage-1", "127.0.0.1:1", None)).unwrap();
        let b = f.write(|c| register_node(c, "storage-2", "127.0.0.1:2", None)).unwrap();
        let a2 = f.write(|c| register_node(c, "storage-1", "127.0.0.1:9", None)).unwrap();
        assert_eq!((a, b, a2), (1, 2, 1));
    }

    #[test]
    fn xattrs_set_get_list_remove_and_go_with_the_inode() {
        let f = Fixture::new();
        let file = f.mk(ROOT_INO, "f", FileKind::RegularFile);
        assert!(!get_attr(&f.read(), file).unwrap().has_xattrs);
        let set = |name: &str, value: &[u8], mode| f.write(|c| set_xattr(c, file, name.as_bytes(), value, mode));
        assert!(set("user.a", b"1", XattrMode::Set).unwrap().has_xattrs);
        set("user.b", &[7u8; MAX_XATTR_VALUE], XattrMode::Create).unwrap();
        assert_eq!(
            f.kind_of(set("user.a", b"2", XattrMode::Create)),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            f.kind_of(set("user.c", b"2", XattrMode::Replace)),
            ErrorKind::NoAttribute
        );
        assert_eq!(
            f.kind_of(set("user.big", &[0u8; MAX_XATTR_VALUE + 1], XattrMode::Set)),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            f.kind_of(set("system.posix_acl_access", b"", XattrMode::Set)),
            ErrorKind::Unsupported
        );
        assert_eq!(f.kind_of(set("user.", b"", XattrMode::Set)), ErrorKind::Unsupported);
        set("user.a", b"22", XattrMode::Replace).unwrap();
        let r = f.read();
        assert_eq!(get_xattr(&r, file, b"user.a").unwrap(), b"22");
        assert_eq!(get_xattr(&r, file, b"user.b").unwrap().len(), MAX_XATTR_VALUE);
        assert_eq!(f.kind_of(get_xattr(&r, file, b"user.zz")), ErrorKind::NoAttribute);
        assert_eq!(
            list_xattrs(&r, file).unwrap(),
            vec![b"user.a".to_vec(), b"user.b".to_vec()]
        );
        drop(r);
        assert!(
            f.write(|c| remove_xattr(c, file, b"user.a")).unwrap().has_xattrs,
            "user.b is left"
        );
        assert!(!f.write(|c| remove_xattr(c, file, b"user.b")).unwrap().has_xattrs);
        assert_eq!(
            f.kind_of(f.write(|c| remove_xattr(c, file, b"user.a"))),
            ErrorKind::NoAttribute
        );
        f.write_closed(|c| unlink(c, ROOT_INO, b"f")).unwrap();
        let r = f.read();
        assert_eq!(r.xattrs.iter().unwrap().count(), 0, "attributes go with their inode");
    }
}
