//! `dfs status`: the cluster as the metaserver sees it.

use std::fmt::Write;
use std::time::Duration;

use dfs_common::Config;
use dfs_proto::meta::{ClusterReport, ClusterStatus, NodeReport, NodeState};
use dfs_proto::tls::TlsIdentity;
use dfs_proto::{Peer, RpcError};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Config(#[from] dfs_common::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] dfs_proto::tls::TlsError),
    #[error(transparent)]
    Endpoint(#[from] dfs_proto::endpoint::EndpointError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

/// A connection to the metaserver named in `config`, with the config's client certificate.
pub fn connect(config: &Config, timeout: Duration) -> Result<(quinn::Endpoint, Peer), StatusError> {
    let client = config.client()?;
    let tls = TlsIdentity::load(&config.tls_files(&client.cert, &client.key))?;
    let endpoint = dfs_proto::endpoint::client(tls.client_config()?)?;
    let peer = Peer::new(
        endpoint.clone(),
        config.cluster.metaserver.clone(),
        config.cluster.metaserver_name.clone(),
        timeout,
    );
    Ok((endpoint, peer))
}

/// Asks the metaserver named in `config` for the cluster report.
pub async fn fetch(config: &Config, timeout: Duration) -> Result<ClusterReport, StatusError> {
    let (endpoint, peer) = connect(config, timeout)?;
    let report = peer.call(ClusterStatus {}, timeout).await;
    endpoint.close(0u32.into(), b"done");
    Ok(report?)
}

pub fn state_label(n: &NodeReport) -> String {
    let state = match n.state {
        NodeState::Up => "up",
        NodeState::Down => "DOWN",
        NodeState::Dead => "DEAD",
    };
    if n.draining {
        format!("{state},drain")
    } else {
        state.to_owned()
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn render(report: &ClusterReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<22} {:<10} {:>9} {:>11} {:>11} {:>8} {:>8} {:>10}",
        "STORAGE DAEMON", "ADDRESS", "STATE", "PIECES", "STORED", "FREE", "COPYING", "DELETING", "LAST SEEN"
    );
    let (mut pieces, mut bytes, mut free, mut up) = (0, 0, 0, 0);
    for n in &report.nodes {
        let seen = match n.last_seen_ms {
            Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
            None => "never".into(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:<10} {:>9} {:>11} {:>11} {:>8} {:>8} {:>10}",
            n.node.name,
            n.node.addr,
            state_label(n),
            n.usage.pieces,
            human_bytes(n.usage.bytes),
            human_bytes(n.usage.free_bytes),
            n.incoming_copies,
            n.pending_deletes,
            seen
        );
        pieces += n.usage.pieces;
        bytes += n.usage.bytes;
        if n.node.up {
            free += n.usage.free_bytes;
            up += 1;
        }
    }
    let _ = writeln!(
        out,
        "{:<16} {:<22} {:<10} {:>9} {:>11} {:>11}",
        "total",
        format!("{} daemons", report.nodes.len()),
        format!("{up} up"),
        pieces,
        human_bytes(bytes),
        human_bytes(free)
    );
    let _ = writeln!(
        out,
        "\nfiles: {}   directories: {}   symlinks: {}   chunk size: {}",
        report.files,
        report.directories,
        report.symlinks,
        human_bytes(report.chunk_size)
    );
    let _ = writeln!(
        out,
        "mount sessions: {}   pieces awaiting deletion: {}   unlinked files still open: {}",
        report.sessions, report.pending_deletes, report.orphaned_files
    );
    let r = &report.redundancy;
    let _ = writeln!(
        out,
        "\nreplication factor: {} (default)   pieces: {}   copies: {}",
        report.replicas, r.pieces, r.copies
    );
    let health = if r.lost > 0 {
        "LOST DATA"
    } else if r.unavailable > 0 {
        "UNAVAILABLE DATA"
    } else if r.under_replicated > 0 {
        "degraded"
    } else if r.unverified_daemons > 0 {
        // A copy missing from a daemon that has not confirmed its holdings is not counted yet.
        "not yet verified"
    } else {
        "healthy"
    };
    let _ = writeln!(
        out,
        "redundancy: {health}   under-replicated: {}   unavailable: {}   lost: {}   (checked {:.0}s ago)",
        r.under_replicated,
        r.unavailable,
        r.lost,
        r.scanned_ms_ago.min(999_000) as f64 / 1000.0
    );
    if r.unverified_daemons > 0 {
        let _ = writeln!(
            out,
            "  {} storage daemons have not yet confirmed the copies they are recorded with",
            r.unverified_daemons
        );
    }
    let _ = writeln!(
        out,
        "repairs in progress: {}   moves in progress: {}   done since start: {} repairs, {} moves",
        r.repairs_in_flight, r.moves_in_flight, r.repairs_done, r.moves_done
    );
    out
}
