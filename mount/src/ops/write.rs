//! Writing: segments queued to streams, one per chunk being written, to every copy of its
//! new piece; placement of new pieces (`AllocatePiece`), with another daemon tried when one
//! cannot be reached.

use super::*;

impl Mount {
    pub async fn write(&self, ino: Ino, offset: u64, data: Bytes) -> FsResult<u32> {
        let state = self.state_or_new(ino);
        let mut w = state.writer.lock().await;
        if let Some(e) = w.error.take() {
            // A stream of earlier writes failed: they are lost (and their writers told).
            self.fail_writes(&state, &mut w, &e);
        }
        if w.fence.is_none() {
            w.fence = self.meta.fence(ino);
        }
        let len = data.len();
        let mut pos = 0usize;
        while pos < len {
            let at = offset + pos as u64;
            let chunk = at / self.chunk_size;
            let within = at % self.chunk_size;
            let n = (len - pos).min((self.chunk_size - within) as usize);
            match self
                .write_segment(&state, &mut w, chunk, within, data.slice(pos..pos + n))
                .await
            {
                Ok(()) => {}
                // Nothing of this part was taken: what came before stands (a short write).
                Err(SegmentError::Refused(e)) if pos > 0 => {
                    tracing::debug!("inode {ino}: short write of {pos} of {len} bytes: {e}");
                    return Ok(pos as u32);
                }
                Err(SegmentError::Refused(e)) => return Err(e),
                Err(SegmentError::Lost(e)) => {
                    self.fail_writes(&state, &mut w, &e);
                    return Err(e);
                }
            }
            pos += n;
            state.written();
            w.last_write = std::time::Instant::now();
            w.dirty = true;
            w.end = w.end.max(at + n as u64);
            state.mark_dirty(at + n as u64);
        }
        if w.done.len() >= COMMIT_EVERY {
            self.commit_some(&state, &mut w).await;
        }
        Ok(len as u32)
    }

    /// Long writes commit as they go, so the metaserver's view and memory stay bounded. A
    /// failure only defers it (to the next one, or the close).
    pub(super) async fn commit_some(&self, state: &InodeState, w: &mut Writer) {
        let ino = state.ino;
        let request = CommitWrite {
            ino,
            pieces: w.done.clone(),
            min_size: 0,
            attrs: Default::default(),
            id: CommitId::default(),
            fence: self.meta.fence_for_commit(w.fence),
            pieces_in_flight: false,
        };
        match self.meta.commit(request).await {
            Ok(attr) => {
                state.remember(&attr);
                w.done.clear();
                self.create_logged(ino, w);
                state.cache.lock().await.invalidate();
            }
            Err(e) => tracing::debug!("inode {ino}: intermediate commit deferred: {e}"),
        }
    }

    async fn write_segment(
        &self,
        state: &InodeState,
        w: &mut Writer,
        chunk: u64,
        within: u64,
        data: Bytes,
    ) -> Result<(), SegmentError> {
        if !w.open.contains_key(&chunk) {
            let opened = self.open_chunk(state, w, chunk).await;
            if let Some(e) = w.error.take() {
                // Settling finished streams to make room found one that failed.
                return Err(SegmentError::Lost(e));
            }
            opened?;
        }
        w.clock += 1;
        let clock = w.clock;
        let oc = w.open.get_mut(&chunk).expect("chunk just opened");
        oc.last_use = clock;
        oc.end = oc.end.max(within + data.len() as u64);
        if oc.tx.send((within, data)).await.is_ok() {
            return Ok(());
        }
        // The stream task ended early, with the writes it had taken: its result says why.
        let oc = w.open.remove(&chunk).expect("chunk present");
        Err(SegmentError::Lost(match oc.task.await {
            Ok(Err(e)) => e,
            _ => FsError::io(format!(
                "inode {}: stream for piece {} ended unexpectedly",
                state.ino, oc.alloc.piece
            )),
        }))
    }

    /// A place for a new piece of `chunk`, avoiding daemons this mount recently failed to
    /// reach (unless nothing else is left).
    pub(super) async fn allocate(&self, ino: Ino, chunk: u64, exclude: Vec<u32>) -> FsResult<Allocation> {
        let mut avoid = exclude.clone();
        for n in self.storage.suspects() {
            if !avoid.contains(&n) {
                avoid.push(n);
            }
        }
        let first = self
            .meta
            .call(AllocatePiece {
                ino,
                chunk,
                exclude: avoid.clone(),
            })
            .await;
        let result = match first {
            // Suspects were all there was (no room elsewhere, or they hold the chunk being
            // rewritten, e.g. daemons back from a restart): try them after all.
            Err(e)
                if avoid.len() > exclude.len()
                    && matches!(
                        e.remote_kind(),
                        Some(ErrorKind::NoSpace | ErrorKind::StorageUnavailable)
                    ) =>
            {
                self.meta.call(AllocatePiece { ino, chunk, exclude }).await
            }
            other => other,
        };
        result.map_err(|e| {
            let e = FsError::from(e);
            tracing::warn!("inode {ino}: no place for chunk {chunk}: {e}");
            e
        })
    }

    /// Opens a stream to every daemon of the allocation that answers; None if none does.
    pub(super) async fn start_copies(
        &self,
        alloc: &Allocation,
    ) -> (Vec<(NodeAddr, PieceStream)>, Vec<dfs_proto::RpcError>) {
        let starts = alloc.nodes.iter().map(|node| async move {
            let r = self
                .storage
                .start_piece(node, alloc.piece, alloc.base, self.timeouts.connect)
                .await;
            (node.clone(), r)
        });
        let mut streams = Vec::new();
        let mut errors = Vec::new();
        for (node, r) in futures_util::future::join_all(starts).await {
            match r {
                Ok(s) => streams.push((node, s)),
                Err(e) => {
                    if e.is_unavailable() {
                        self.storage.suspect(node.id);
                    }
                    errors.push(e);
                }
            }
        }
        (streams, errors)
    }

    /// Starts the streams of a new piece for `chunk`. `Lost` if making room meant a commit
    /// that failed (the writes it carried are gone), `Refused` if no place could be found.
    async fn open_chunk(&self, state: &InodeState, w: &mut Writer, chunk: u64) -> Result<(), SegmentError> {
        let ino = state.ino;
        if w.open.len() >= MAX_OPEN_CHUNKS
            && let Some(victim) = w.least_recent()
        {
            w.close_chunk(victim);
        }
        while w.closing.len() > MAX_CLOSING_CHUNKS {
            w.settle_one().await;
        }
        if w.has_pending(chunk) {
            // Back to a chunk whose new piece is written but not committed: commit it first,
            // so that the next piece starts from it (copy-on-write of the committed piece).
            self.commit(state, w, "rewrite of a pending chunk")
                .await
                .map_err(SegmentError::Lost)?;
        }
        // The piece set aside at create has no base: it is right only while chunk 0 is known
        // to be empty (another mount may have written it since, e.g. between two lock holders).
        let first_piece = match w.first_piece.take() {
            Some(a) if chunk == 0 => {
                let cache = state.cache.lock().await;
                (cache.windows.contains(&0) && !cache.chunks.contains_key(&0)).then_some(a)
            }
            other => {
                w.first_piece = other;
                None
            }
        };
        let mut alloc = match first_piece {
            Some(a) => a,
            None => self.allocate(ino, chunk, vec![]).await?,
        };
        let mut exclude = Vec::new();
        let mut base_lookups = 0;
        let streams = loop {
            let (streams, errors) = self.start_copies(&alloc).await;
            for e in &errors {
                tracing::warn!("inode {ino}: chunk {chunk}: {e}");
            }
            if !streams.is_empty() {
                if streams.len() < alloc.replicas as usize {
                    tracing::warn!(
                        "inode {ino}: chunk {chunk} (piece {}) is written with {} of {} copies; the metaserver will add the rest",
                        alloc.piece,
                        streams.len(),
                        alloc.replicas
                    );
                }
                break streams;
            }
            // The base named by the allocation is gone from every daemon offered (moved, or
            // rewritten by another mount since): ask where the chunk lives now.
            let base_gone = alloc.base.is_some()
                && !errors.is_empty()
                && errors.iter().all(|e| e.remote_kind() == Some(ErrorKind::NotFound));
            if base_gone && base_lookups < 3 {
                base_lookups += 1;
                tracing::info!("inode {ino}: chunk {chunk} moved since it was located; locating it again");
                alloc = self.allocate(ino, chunk, exclude.clone()).await?;
                continue;
            }
            let unavailable = errors.iter().all(|e| e.is_unavailable());
            if unavailable && alloc.base.is_none() && exclude.len() < 6 {
                exclude.extend(alloc.nodes.iter().map(|n| n.id));
                tracing::warn!("inode {ino}: placing chunk {chunk} elsewhere");
                alloc = self.allocate(ino, chunk, exclude.clone()).await?;
                continue;
            }
            let e = match errors.into_iter().next() {
                Some(e) => FsError::from(e),
                None => FsError::io(format!("inode {ino}: no storage daemon offered for chunk {chunk}")),
            };
            tracing::warn!("inode {ino}: cannot write chunk {chunk}: {e}");
            return Err(e.into());
        };
        let nodes = streams.iter().map(|(node, _)| node.id).collect();
        let (tx, rx) = mpsc::channel(SEGMENT_QUEUE);
        let task = tokio::spawn(stream_copies(
            streams,
            rx,
            self.timeouts.data,
            alloc.piece,
            self.storage.clone(),
        ));
        w.open.insert(
            chunk,
            OpenChunk {
                alloc,
                nodes,
                end: 0,
                tx,
                task,
                last_use: w.clock,
            },
        );
        Ok(())
    }
}

/// Why a write could not queue a segment.
enum SegmentError {
    /// Before anything was taken (no place for the chunk): earlier writes are unaffected.
    Refused(FsError),
    /// A stream that had taken earlier writes failed: they are lost.
    Lost(FsError),
}

/// Failures of placement (the default for `?`) take nothing that was written.
impl From<FsError> for SegmentError {
    fn from(e: FsError) -> Self {
        SegmentError::Refused(e)
    }
}

/// Feeds queued segments into a piece stream, then waits for the piece to be durable.
async fn stream_segments(
    mut stream: PieceStream,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    timeout: Duration,
) -> FsResult<u64> {
    while let Some((offset, data)) = rx.recv().await {
        stream.send_segment(offset, data, timeout).await?;
    }
    stream.finish(timeout).await
}

/// Feeds every copy of a piece the same segments (shared buffers, no copies) and waits for
/// each to be durable. A copy that fails is left behind; the piece is stored if at least one
/// copy is durable, and the metaserver re-makes the missing ones.
pub(super) async fn stream_copies(
    streams: Vec<(NodeAddr, PieceStream)>,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    timeout: Duration,
    piece: dfs_proto::types::PieceId,
    storage: Arc<StoragePool>,
) -> FsResult<Stored> {
    let mut copies = Vec::new();
    for (node, stream) in streams {
        let (tx, copy_rx) = mpsc::channel(SEGMENT_QUEUE);
        copies.push((node, Some(tx), tokio::spawn(stream_segments(stream, copy_rx, timeout))));
    }
    while let Some(segment) = rx.recv().await {
        for (node, tx, _) in copies.iter_mut() {
            if let Some(sender) = tx
                && sender.send(segment.clone()).await.is_err()
            {
                // That copy's stream failed; its error is collected below.
                tracing::debug!("piece {piece}: copy on {node} stopped taking data");
                *tx = None;
            }
        }
    }
    let mut stored = Stored {
        len: 0,
        nodes: Vec::new(),
    };
    let mut first_error = None;
    let total = copies.len();
    for (node, tx, task) in copies {
        drop(tx);
        let outcome = task
            .await
            .unwrap_or_else(|e| Err(FsError::io(format!("piece {piece}: writer task failed: {e}"))));
        match outcome {
            Ok(len) if stored.nodes.is_empty() || len == stored.len => {
                stored.len = len;
                stored.nodes.push(node.id);
            }
            Ok(len) => {
                tracing::error!(
                    "piece {piece}: copy on {node} is {len} bytes, others {}: leaving it out",
                    stored.len
                );
            }
            Err(e) => {
                storage.suspect(node.id);
                tracing::warn!("piece {piece}: copy on {node} failed: {}", e.message);
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if stored.nodes.is_empty() => Err(e),
        Some(_) => {
            tracing::warn!(
                "piece {piece}: stored with {} of {total} copies; the metaserver will restore the rest",
                stored.nodes.len()
            );
            Ok(stored)
        }
        None => Ok(stored),
    }
}
