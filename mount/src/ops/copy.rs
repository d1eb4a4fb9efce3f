//! `copy_file_range`: whole chunks are copied by the storage daemons holding the source, each
//! from its own copy to its own disk (`AllocateCopy`: a new piece whose base is the source's
//! piece), so their bytes never pass through this mount. What cannot be copied that way (the
//! unaligned head and tail of a range, a range whose source and destination offsets differ
//! within a chunk, holes, a copy that fails) is read and written through the mount.
//!
//! A copy is a write: its pieces join the destination's uncommitted writes and are committed
//! at the next close or fsync (or sooner), with the same durability and error reporting.

use super::*;
use dfs_proto::types::PieceId;
use futures_util::StreamExt;

use super::write::stream_copies;

/// The most one call copies (the reply counts bytes in a u32); callers loop for the rest.
const MAX_COPY: u64 = 1 << 30;
/// The most one call copies through the mount, so a call stays well inside its deadline.
const MAX_COPY_THROUGH: u64 = 64 << 20;
/// Read and write size of a copy through the mount.
const THROUGH_STEP: u64 = 1 << 20;
/// Chunks the daemons copy at once (their fsyncs overlap).
const PARALLEL_COPIES: usize = 4;
/// Chunks handled under one hold of the destination's writer.
const MAX_RUN: usize = 16;

/// How one step of a copy ended.
enum Step {
    /// Copied up to this position of the range; go on.
    Next(u64),
    /// Copied this much of the range in all; stop there.
    Short(u64),
}

/// One destination chunk to be made from the first `n` bytes of `source`.
struct ChunkCopy {
    source: ChunkLocation,
    at_out: u64,
    n: u64,
}

impl Mount {
    /// Copies up to `len` bytes from `ino_in` at `off_in` to `ino_out` at `off_out`; returns
    /// how many were copied (0 at or past the source's end).
    pub async fn copy_range(&self, ino_in: Ino, off_in: u64, ino_out: Ino, off_out: u64, len: u64) -> FsResult<u32> {
        if len == 0 {
            return Ok(0);
        }
        if ino_in == ino_out && off_in < off_out.saturating_add(len) && off_out < off_in.saturating_add(len) {
            return Err(FsError::new(
                libc::EINVAL,
                format!("inode {ino_in}: copy_file_range of overlapping ranges"),
            ));
        }
        let cs = self.chunk_size;
        let src = self.state_or_new(ino_in);
        if src.is_dirty() {
            // The copy is of what this mount wrote too.
            self.flush_inode(&src).await?;
        }
        let (src_size, _) = self
            .locate(&src, off_in / cs, off_in / cs, off_in.saturating_add(len))
            .await?;
        if off_in >= src_size {
            return Ok(0);
        }
        let aligned = off_in % cs == off_out % cs;
        let limit = if aligned {
            MAX_COPY.max(cs) / cs * cs
        } else {
            MAX_COPY_THROUGH
        };
        let len = len.min(src_size - off_in).min(limit);
        let last = (off_in + len - 1) / cs;
        let (_, src_chunks) = self.locate(&src, off_in / cs, last, off_in + len).await?;
        let first_src_chunk = off_in / cs;

        let mut pos = 0u64;
        let mut through_bytes = 0u64;
        while pos < len {
            let step = async {
                // A run of whole chunks the daemons can copy, or else one piece of a chunk.
                let mut run = Vec::new();
                let mut run_end = pos;
                while run_end < len && run.len() < MAX_RUN {
                    let (at_in, at_out) = (off_in + run_end, off_out + run_end);
                    let n = (len - run_end).min(cs - at_out % cs);
                    let source = src_chunks[(at_in / cs - first_src_chunk) as usize].as_ref();
                    match source.filter(|s| aligned && at_in.is_multiple_of(cs) && s.len > 0) {
                        Some(source) => run.push(ChunkCopy {
                            source: source.clone(),
                            at_out,
                            n,
                        }),
                        None => break,
                    }
                    run_end += n;
                }
                let mut through = Vec::new();
                if run.is_empty() {
                    let (at_in, at_out) = (off_in + pos, off_out + pos);
                    let n = (len - pos).min(cs - at_out % cs);
                    let source_is_hole = (at_in / cs..=(at_in + n - 1) / cs)
                        .all(|c| src_chunks[(c - first_src_chunk) as usize].is_none());
                    if !(source_is_hole && self.copy_hole(ino_out, at_out, n).await?) {
                        if through_bytes > 0 && through_bytes + n > MAX_COPY_THROUGH {
                            // Enough through the mount for one call: the caller asks again.
                            return Ok(Step::Short(pos));
                        }
                        through_bytes += n;
                        through.push((at_in, at_out, n));
                    }
                    run_end = pos + n;
                } else {
                    for failed in self.copy_chunks(ino_in, ino_out, run).await? {
                        through.push((failed.source.chunk * cs, failed.at_out, failed.n));
                    }
                }
                for (at_in, at_out, n) in through {
                    let copied = self.copy_through(ino_in, at_in, ino_out, at_out, n).await?;
                    if copied < n {
                        // The source ended early (truncated meanwhile): a short copy.
                        return Ok(Step::Short(at_out - off_out + copied));
                    }
                }
                Ok(Step::Next(run_end))
            };
            match step.await {
                Ok(Step::Next(next)) => pos = next,
                Ok(Step::Short(copied)) => return Ok(copied as u32),
                // What was copied stands (a short copy); a failure that lost it is reported
                // at the destination's next fsync or close, as for writes.
                Err(e) if pos > 0 => {
                    tracing::debug!("inode {ino_out}: copy cut short after {pos} bytes: {e}");
                    return Ok(pos as u32);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(len as u32)
    }

    /// A copy from a hole onto bytes that read as zeros already (a hole, or past the end of
    /// the destination) only has to extend the destination. False where that does not apply.
    async fn copy_hole(&self, ino_out: Ino, at_out: u64, n: u64) -> FsResult<bool> {
        let cs = self.chunk_size;
        let chunk = at_out / cs;
        let dst = self.state_or_new(ino_out);
        let mut w = dst.writer.lock().await;
        if w.open.contains_key(&chunk) || w.has_pending(chunk) {
            return Ok(false);
        }
        let (size, locations) = self.locate(&dst, chunk, chunk, 0).await?;
        let zeros = match &locations[0] {
            _ if at_out >= dst.visible_size(size) => true,
            None => true,
            Some(loc) => loc.len <= at_out % cs,
        };
        if !zeros {
            return Ok(false);
        }
        dst.written();
        w.last_write = std::time::Instant::now();
        w.dirty = true;
        w.end = w.end.max(at_out + n);
        dst.mark_dirty(at_out + n);
        Ok(true)
    }

    /// Replaces each chunk of `ino_out` in `run` by the first `n` bytes of its source chunk,
    /// copied by the daemons (several chunks at once). Returns the copies that were not made
    /// that way, for the caller to copy through the mount: a chunk whose data continues past
    /// the copy, or one no daemon could copy.
    async fn copy_chunks(&self, ino_in: Ino, ino_out: Ino, run: Vec<ChunkCopy>) -> FsResult<Vec<ChunkCopy>> {
        let cs = self.chunk_size;
        let dst = self.state_or_new(ino_out);
        let mut w = dst.writer.lock().await;
        if let Some(e) = w.error.take() {
            self.fail_writes(&dst, &mut w, &e);
        }
        if run.iter().any(|c| {
            let chunk = c.at_out / cs;
            w.open.contains_key(&chunk) || w.has_pending(chunk)
        }) {
            // This mount's own writes to those chunks come first.
            self.commit(&dst, &mut w, "copy over pending writes").await?;
        }
        let mut skipped = Vec::new();
        let mut run = run;
        if let Some(last) = run.last()
            && last.n < cs
        {
            // A new piece replaces the whole chunk: only right if nothing follows the copy.
            let chunk = last.at_out / cs;
            let visible = dst.visible_size(self.locate(&dst, chunk, chunk, 0).await?.0);
            if visible > last.at_out + last.n {
                skipped.extend(run.pop());
            }
        }
        if w.fence.is_none() {
            w.fence = self.meta.fence(ino_out);
        }
        let copies = futures_util::stream::iter(run.into_iter().map(|c| async move {
            let piece = self.copy_piece(ino_in, &c.source, ino_out, c.at_out / cs, c.n).await;
            (c, piece)
        }))
        .buffered(PARALLEL_COPIES)
        .collect::<Vec<_>>()
        .await;
        for (c, piece) in copies {
            let Some(piece) = piece else {
                skipped.push(c);
                continue;
            };
            if piece.chunk == 0 {
                // The piece set aside at create is for an empty chunk 0; this one is not.
                w.first_piece = None;
            }
            w.done.push(piece);
            dst.written();
            w.last_write = std::time::Instant::now();
            w.dirty = true;
            w.end = w.end.max(c.at_out + c.n);
            dst.mark_dirty(c.at_out + c.n);
        }
        if w.done.len() >= COMMIT_EVERY {
            self.commit_some(&dst, &mut w).await;
        }
        skipped.sort_by_key(|c| c.at_out);
        Ok(skipped)
    }

    /// Has the daemons holding `source` make a new piece for `chunk` of `ino_out` from its first
    /// `len` bytes, and waits for it to be durable. None if none of them could.
    async fn copy_piece(
        &self,
        ino_in: Ino,
        source: &ChunkLocation,
        ino_out: Ino,
        chunk: u64,
        len: u64,
    ) -> Option<WrittenPiece> {
        let mut exclude = Vec::new();
        for _attempt in 0..2 {
            let request = AllocateCopy {
                ino: ino_out,
                chunk,
                src_ino: ino_in,
                src_chunk: source.chunk,
                len,
                exclude: exclude.clone(),
            };
            let alloc = match self.meta.call(request).await {
                Ok(alloc) => alloc,
                Err(e) => {
                    tracing::debug!("inode {ino_out}: chunk {chunk} not copied by the daemons: {e}");
                    return None;
                }
            };
            let (streams, errors) = self.start_copies(&alloc).await;
            if streams.is_empty() {
                for e in &errors {
                    tracing::debug!("inode {ino_out}: chunk {chunk}: copy of piece {}: {e}", source.piece);
                }
                exclude.extend(alloc.nodes.iter().map(|n| n.id));
                continue;
            }
            return self.finish_copy(ino_out, streams, alloc.piece, chunk).await;
        }
        None
    }

    /// Ends the streams of a copied piece (no segments: the daemons copy the base) and waits
    /// for it to be durable.
    async fn finish_copy(
        &self,
        ino: Ino,
        streams: Vec<(NodeAddr, PieceStream)>,
        piece: PieceId,
        chunk: u64,
    ) -> Option<WrittenPiece> {
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        match stream_copies(streams, rx, self.timeouts.data, piece, self.storage.clone()).await {
            Ok(stored) => Some(WrittenPiece {
                chunk,
                piece,
                nodes: stored.nodes,
                len: stored.len,
            }),
            Err(e) => {
                tracing::warn!("inode {ino}: chunk {chunk}: daemon-side copy failed, copying through the mount: {e}");
                None
            }
        }
    }

    /// Copies `n` bytes by reading and writing them; returns how many there were to copy.
    async fn copy_through(&self, ino_in: Ino, at_in: u64, ino_out: Ino, at_out: u64, n: u64) -> FsResult<u64> {
        let mut done = 0u64;
        while done < n {
            let step = (n - done).min(THROUGH_STEP);
            let data = self.read(ino_in, at_in + done, step as u32).await?;
            if data.is_empty() {
                break;
            }
            let got = data.len() as u64;
            let mut written = 0u64;
            let data = Bytes::from(data);
            while written < got {
                let w = self
                    .write(ino_out, at_out + done + written, data.slice(written as usize..))
                    .await?;
                if w == 0 {
                    return Err(FsError::io(format!("inode {ino_out}: a write took nothing")));
                }
                written += w as u64;
            }
            done += got;
            if got < step {
                break;
            }
        }
        Ok(done)
    }
}
