//! Reading: chunk locations (cached per window of chunks) and reads from one copy of each
//! piece, moving to another copy, or asking where the chunk lives now, when one fails.

use super::*;

impl Mount {
    /// Locations of chunks `first..=last` and the file size, fetching what is not cached.
    pub(super) async fn locate(
        &self,
        state: &InodeState,
        first: u64,
        last: u64,
        want_end: u64,
    ) -> FsResult<(u64, Vec<Option<ChunkLocation>>)> {
        let mut cache = state.cache.lock().await;
        if state.take_stale_cache() {
            cache.invalidate();
            cache.size = 0;
        }
        let window = CHUNK_WINDOW as u64;
        // A read past the known end may be of data another mount appended: look again.
        let mut refresh_size = want_end > cache.size;
        for w in first / window..=last / window {
            if cache.windows.contains(&w) && !refresh_size {
                continue;
            }
            let reply = self
                .meta
                .call(ChunkMap {
                    ino: state.ino,
                    first: w * window,
                    count: CHUNK_WINDOW,
                })
                .await?;
            cache.size = state.visible_size(reply.attr.size);
            cache.fill(w, reply.chunks);
            refresh_size = false;
        }
        let locations = (first..=last).map(|c| cache.chunks.get(&c).cloned()).collect();
        Ok((cache.size, locations))
    }

    /// Reads from one copy of a piece: those on daemons believed up first, and among them those
    /// this mount has not recently failed to reach. A copy that fails (unreachable, too slow,
    /// damaged) is skipped for the next one. Returns the bytes read and the daemon that served.
    async fn read_copy(
        &self,
        ino: Ino,
        loc: &ChunkLocation,
        offset: u64,
        want: usize,
        out: &mut Vec<u8>,
    ) -> FsResult<(usize, NodeAddr)> {
        let suspects = self.storage.suspects();
        // Daemons the metaserver knows are down are not tried: the read fails at once.
        let mut order: Vec<&NodeAddr> = loc.nodes.iter().filter(|n| n.up).collect();
        // Different pieces start at different copies, so reads spread over the daemons.
        if !order.is_empty() {
            let len = order.len();
            order.rotate_left((loc.piece % len as u64) as usize);
        }
        order.sort_by_key(|n| suspects.contains(&n.id));
        let mark = out.len();
        let mut last_error = None;
        for node in order {
            match self
                .storage
                .read_into(node, loc.piece, offset, want, out, self.timeouts.request)
                .await
            {
                Ok(n) => return Ok((n, node.clone())),
                Err(e) => {
                    out.truncate(mark);
                    self.storage.suspect(node.id);
                    tracing::warn!(
                        "inode {ino}: chunk {} from {node}: {}; trying another copy",
                        loc.chunk,
                        e.message
                    );
                    last_error = Some(e);
                }
            }
        }
        Err(match last_error {
            Some(e) if loc.nodes.iter().any(|n| n.up) => FsError::new(e.errno, format!("inode {ino}: {}", e.message)),
            _ => storage_down(ino, loc),
        })
    }

    pub async fn read(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let state = self.state_or_new(ino);
        if state.is_dirty() {
            // Reads see this mount's own writes: commit them first. If that fails, the writes
            // are gone (their writers hear of it) and the read sees what is stored.
            let mut w = state.writer.lock().await;
            let _ = self.commit(&state, &mut w, "read").await;
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let cs = self.chunk_size;
        let want_end = offset.saturating_add(size as u64);
        let (first, last) = (offset / cs, (want_end - 1) / cs);
        let (file_size, locations) = self.locate(&state, first, last, want_end).await?;
        let end = want_end.min(file_size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, loc) in locations.iter().enumerate() {
            let chunk = first + i as u64;
            let chunk_start = chunk * cs;
            let a = offset.max(chunk_start);
            let b = end.min(chunk_start + cs);
            if a >= b {
                continue;
            }
            // Bytes of this chunk the piece holds; holes and the rest of the range read as zeros.
            let valid_end = match loc {
                Some(loc) => b.min(chunk_start + loc.len),
                None => a,
            };
            if let Some(loc) = loc.as_ref().filter(|_| a < valid_end) {
                let want = (valid_end - a) as usize;
                let mut result = self.read_copy(ino, loc, a - chunk_start, want, &mut out).await;
                if result.is_err() {
                    // Ask the metaserver where the data lives now: the copies this mount knew
                    // may have moved (rebalancing, drain, repair) since it asked.
                    state.cache.lock().await.invalidate();
                    let fresh = self.locate(&state, chunk, chunk, want_end).await;
                    if let Ok((_, fresh)) = fresh
                        && let Some(Some(now)) = fresh.into_iter().next()
                        && (now.piece != loc.piece || now.nodes != loc.nodes)
                        && now.len >= loc.len
                    {
                        tracing::info!("inode {ino}: chunk {chunk} moved; reading its new location");
                        result = self.read_copy(ino, &now, a - chunk_start, want, &mut out).await;
                    }
                }
                match result {
                    Ok((got, node)) if got < want => tracing::warn!(
                        "inode {ino}: piece {} on {node} is shorter than recorded ({got} of {want} bytes); the rest reads as zeros",
                        loc.piece,
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        // Next time, ask the metaserver where (and whether) the data lives.
                        state.cache.lock().await.invalidate();
                        return Err(e);
                    }
                }
            }
            out.resize((b - offset) as usize, 0);
        }
        Ok(out)
    }
}
