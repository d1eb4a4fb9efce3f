//! Accepts QUIC connections and answers one request per stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dfs_proto::meta::*;
use dfs_proto::server::{next_request, reply};
use quinn::{Endpoint, RecvStream, SendStream};

use crate::error::MetaError;
use crate::service::MetaService;

pub async fn serve(endpoint: Endpoint, svc: Arc<MetaService>) {
    dfs_proto::server::accept_streams(endpoint, move |send, recv, remote| {
        handle_stream(svc.clone(), send, recv, remote)
    })
    .await
}

/// Answers a request with the handler's result, logging failures that are the metaserver's own
/// and counting every error by kind.
macro_rules! answer {
    ($send:expr, $remote:expr, $timer:expr, $call:ty, $result:expr) => {{
        let result: Result<_, MetaError> = $result;
        let result = result.map_err(|e| {
            match &e {
                MetaError::Fs(_) => tracing::debug!("{} from {}: {e}", stringify!($call), $remote),
                _ => tracing::error!("{} from {} failed: {e}", stringify!($call), $remote),
            }
            e.to_remote()
        });
        let kind = result.as_ref().err().map(|e| format!("{:?}", e.kind));
        $timer.take().expect("answered once").done(kind);
        reply::<$call>($send, result).await
    }};
}

async fn handle_stream(svc: Arc<MetaService>, mut send: SendStream, mut recv: RecvStream, remote: SocketAddr) {
    let Some(request) = next_request::<MetaRequest>(&mut send, &mut recv, remote).await else {
        return;
    };
    let started = std::time::Instant::now();
    let call = request.name();
    // Dropped unanswered (the task cancelled, a panic) it counts as "abandoned".
    let mut timer = Some(svc.metrics().requests.start(call));
    let s = &mut send;
    let sent = match request {
        MetaRequest::OpenSession(r) => answer!(s, remote, timer, OpenSession, svc.open_session(r).await),
        MetaRequest::KeepAlive(r) => answer!(s, remote, timer, KeepAlive, svc.keep_alive(r).await),
        MetaRequest::CloseSession(r) => answer!(s, remote, timer, CloseSession, svc.close_session(r).await),
        MetaRequest::Lookup(r) => answer!(s, remote, timer, Lookup, svc.lookup(r).await),
        MetaRequest::GetAttr(r) => answer!(s, remote, timer, GetAttr, svc.get_attr(r).await),
        MetaRequest::ReadDir(r) => answer!(s, remote, timer, ReadDir, svc.read_dir(r).await),
        MetaRequest::ReadLink(r) => answer!(s, remote, timer, ReadLink, svc.read_link(r).await),
        MetaRequest::MakeNode(r) => answer!(s, remote, timer, MakeNode, svc.make_node(r).await),
        MetaRequest::Create(r) => answer!(s, remote, timer, Create, svc.create(r).await),
        MetaRequest::Open(r) => answer!(s, remote, timer, Open, svc.open(r).await),
        MetaRequest::Release(r) => answer!(s, remote, timer, Release, svc.release(r).await),
        MetaRequest::ReleaseHandles(r) => answer!(s, remote, timer, ReleaseHandles, svc.release_handles(r).await),
        MetaRequest::SetAttr(r) => answer!(s, remote, timer, SetAttr, svc.set_attr(r).await),
        MetaRequest::Unlink(r) => answer!(s, remote, timer, Unlink, svc.unlink(r).await),
        MetaRequest::RemoveDir(r) => answer!(s, remote, timer, RemoveDir, svc.remove_dir(r).await),
        MetaRequest::Rename(r) => answer!(s, remote, timer, Rename, svc.rename(r).await),
        MetaRequest::Link(r) => answer!(s, remote, timer, Link, svc.link(r).await),
        MetaRequest::ChunkMap(r) => answer!(s, remote, timer, ChunkMap, svc.chunk_map(r).await),
        MetaRequest::AllocatePiece(r) => answer!(s, remote, timer, AllocatePiece, svc.allocate_piece(r).await),
        MetaRequest::AllocateCopy(r) => answer!(s, remote, timer, AllocateCopy, svc.allocate_copy(r).await),
        MetaRequest::CommitWrite(r) => answer!(s, remote, timer, CommitWrite, svc.commit_write(r).await),
        MetaRequest::RetractWrite(r) => answer!(s, remote, timer, RetractWrite, svc.retract_write(r).await),
        MetaRequest::Deallocate(r) => answer!(s, remote, timer, Deallocate, svc.deallocate(r).await),
        MetaRequest::StatFs(r) => answer!(s, remote, timer, StatFs, svc.stat_fs(r).await),
        MetaRequest::ClusterStatus(r) => answer!(s, remote, timer, ClusterStatus, svc.cluster_status(r).await),
        MetaRequest::RegisterNode(r) => answer!(s, remote, timer, RegisterNode, svc.register_node(r).await),
        MetaRequest::Heartbeat(r) => answer!(s, remote, timer, Heartbeat, svc.heartbeat(r).await),
        MetaRequest::Inventory(r) => answer!(s, remote, timer, Inventory, svc.inventory(r).await),
        MetaRequest::GetXattr(r) => answer!(s, remote, timer, GetXattr, svc.get_xattr(r).await),
        MetaRequest::ListXattr(r) => answer!(s, remote, timer, ListXattr, svc.list_xattr(r).await),
        MetaRequest::SetXattr(r) => answer!(s, remote, timer, SetXattr, svc.set_xattr(r).await),
        MetaRequest::RemoveXattr(r) => answer!(s, remote, timer, RemoveXattr, svc.remove_xattr(r).await),
        MetaRequest::SetLock(r) => answer!(s, remote, timer, SetLock, svc.set_lock(r).await),
        MetaRequest::TestLock(r) => answer!(s, remote, timer, TestLock, svc.test_lock(r).await),
        MetaRequest::Drain(r) => answer!(s, remote, timer, Drain, svc.drain(r).await),
        MetaRequest::ForgetNode(r) => answer!(s, remote, timer, ForgetNode, svc.forget_node(r).await),
        MetaRequest::Backup(r) => answer!(s, remote, timer, Backup, svc.backup(r).await),
        MetaRequest::BackupRead(r) => answer!(s, remote, timer, BackupRead, svc.backup_read(r).await),
        MetaRequest::SyncCreates(r) => answer!(s, remote, timer, SyncCreates, svc.sync_creates(r).await),
    };
    if sent.is_ok() {
        let _ = send.finish();
    }
    dfs_proto::frame::finish_reading(&mut recv);
    tracing::debug!("{call} from {remote} answered in {:?}", started.elapsed());
}

/// Runs housekeeping every second, and right away when a file may have lost its last user.
pub async fn housekeeping(svc: Arc<MetaService>) {
    let signal = svc.reaper_signal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = signal.notified() => {}
        }
        svc.housekeeping().await;
    }
}
