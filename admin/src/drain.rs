//! `dfs drain NODE`: empty a storage daemon onto the others, showing progress, and say when it
//! is safe to remove.

use std::io::Write;
use std::time::{Duration, Instant};

use dfs_common::Config;
use dfs_proto::meta::{ClusterStatus, Drain, ForgetNode, ForgottenNode, NodeReport, NodeState};

use crate::status::{StatusError, connect, human_bytes};

/// What is left on a draining daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub pieces: u64,
    pub bytes: u64,
    pub deletes: u64,
}

impl Remaining {
    pub fn of(n: &NodeReport) -> Self {
        Remaining {
            pieces: n.referenced_pieces,
            bytes: n.referenced_bytes,
            deletes: n.pending_deletes,
        }
    }

    /// Nothing references the daemon and it has deleted everything it was told to.
    pub fn is_empty(&self) -> bool {
        self.pieces == 0 && self.deletes == 0
    }
}

/// A text progress bar: `[#####.....] 50%`.
pub fn bar(done: u64, total: u64, width: usize) -> String {
    let fraction = if total == 0 {
        1.0
    } else {
        done.min(total) as f64 / total as f64
    };
    let filled = (fraction * width as f64).round() as usize;
    format!(
        "[{}{}] {:>3.0}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        fraction * 100.0
    )
}

/// Marks `node` as draining (or stops), then, if `wait`, follows the drain until the daemon
/// holds nothing. Returns false if it stopped waiting before that (the daemon is down).
pub async fn run(config: &Config, node: &str, cancel: bool, wait: bool) -> Result<bool, StatusError> {
    let timeout = Duration::from_secs(5);
    let (endpoint, peer) = connect(config, timeout)?;
    let result = async {
        let first = peer
            .call(
                Drain {
                    node: node.to_owned(),
                    cancel,
                },
                timeout,
            )
            .await?;
        if cancel {
            println!("{node}: no longer draining; it takes new data again");
            return Ok(true);
        }
        let start = Remaining::of(&first);
        println!(
            "{node}: draining {} pieces ({}) onto the other daemons; it stays readable meanwhile",
            start.pieces,
            human_bytes(start.bytes)
        );
        if !wait {
            return Ok(start.is_empty());
        }
        let interactive = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let mut last_print = Instant::now() - Duration::from_secs(60);
        let mut down_since: Option<Instant> = None;
        loop {
            let report = peer.call(ClusterStatus {}, timeout).await?;
            let Some(n) = report.nodes.iter().find(|n| n.node.name == node) else {
                println!("{node}: no longer known to the metaserver");
                return Ok(true);
            };
            let left = Remaining::of(n);
            let line = format!(
                "{node}: {} {} pieces ({}) left, {} deletions pending, {} copies under way cluster-wide",
                bar(
                    start.pieces.saturating_sub(left.pieces),
                    start.pieces.max(left.pieces),
                    30
                ),
                left.pieces,
                human_bytes(left.bytes),
                left.deletes,
                report.redundancy.moves_in_flight + report.redundancy.repairs_in_flight,
            );
            if interactive {
                print!("\r{line}   ");
                let _ = std::io::stdout().flush();
            } else if last_print.elapsed() >= Duration::from_secs(5) || left.is_empty() {
                println!("{line}");
                last_print = Instant::now();
            }
            if left.is_empty() {
                if interactive {
                    println!();
                }
                println!("{node} holds no data: it is safe to stop its dfs-storaged and remove it from the cluster");
                return Ok(true);
            }
            if n.state != NodeState::Up && left.pieces == 0 {
                // Only deletions are left, and the daemon is not there to carry them out.
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(30) {
                    println!(
                        "\n{node} is down with {} deletions pending: its data is safely elsewhere, \
                         but its disk still holds copies. Start it to finish, or remove it as it is.",
                        left.deletes
                    );
                    return Ok(false);
                }
            } else {
                down_since = None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    .await;
    endpoint.close(0u32.into(), b"done");
    result
}

/// `dfs node forget NODE`.
pub async fn forget(config: &Config, node: &str) -> Result<ForgottenNode, StatusError> {
    let timeout = Duration::from_secs(10);
    let (endpoint, peer) = connect(config, timeout)?;
    let result = peer
        .call(ForgetNode { node: node.to_owned() }, timeout)
        .await
        .map_err(StatusError::from);
    endpoint.close(0u32.into(), b"done");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar() {
        assert_eq!(bar(0, 10, 10), "[..........]   0%");
        assert_eq!(bar(5, 10, 10), "[#####.....]  50%");
        assert_eq!(bar(10, 10, 10), "[##########] 100%");
        assert_eq!(bar(0, 0, 4), "[####] 100%");
    }
}
