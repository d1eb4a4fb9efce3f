use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use dfs_common::config::{Config, DEFAULT_PATH};
use dfs_proto::Peer;
use dfs_proto::tls::TlsIdentity;
use dfs_storaged::copier::Copier;
use dfs_storaged::membership::Membership;
use dfs_storaged::scrub::Scrubber;
use dfs_storaged::store::PieceStore;

/// dfs storage daemon: stores pieces of file data and serves them to mounts.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// Which [[storaged]] entry of the config to run (needed when there are several).
    #[arg(long)]
    name: Option<String>,
    /// Override the listen address (host:port).
    #[arg(long)]
    listen: Option<String>,
    /// Override the address advertised to clients.
    #[arg(long)]
    advertise: Option<String>,
    /// Override the data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override the most entries any directory under the data directory may hold.
    #[arg(long)]
    fanout: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    dfs_common::logging::init("dfs-storaged");
    let config = Config::load(&args.config)?;
    let mut me = config.storaged(args.name.as_deref())?.clone();
    if let Some(v) = args.listen {
        me.listen = v;
    }
    if let Some(v) = args.advertise {
        me.advertise = Some(v);
    }
    if let Some(v) = args.data_dir {
        me.data_dir = v;
    }
    if let Some(v) = args.fanout {
        if !(16..=4096).contains(&v) {
            bail!("--fanout must be between 16 and 4096");
        }
        me.fanout = v;
    }
    let listen = dfs_common::config::listen_addr(&me.listen)?;
    let data_dir = config.resolve(&me.data_dir);
    let tls = TlsIdentity::load(&config.tls_files(&me.cert, &me.key))?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let store = {
            let dir = data_dir.clone();
            let (fanout, cap, journal) = (me.fanout, me.capacity_bytes, me.journal);
            tokio::task::spawn_blocking(move || PieceStore::open_with_journal(&dir, fanout, cap, journal)).await??
        };
        let store = Arc::new(store);
        let usage = store.usage();
        let endpoint = dfs_proto::endpoint::server(
            listen,
            tls.server_config()?,
            Some(tls.client_config()?),
            &tls.reset_secret(),
        )?;
        tracing::info!(
            "storage daemon {} serving {} on {listen} (advertised as {}), {} pieces / {} bytes stored, fanout {}",
            me.name,
            data_dir.display(),
            me.advertised(),
            usage.pieces,
            usage.bytes,
            me.fanout
        );
        let meta = Peer::new(
            endpoint.clone(),
            config.cluster.metaserver.clone(),
            config.cluster.metaserver_name.clone(),
            Duration::from_secs(3),
        );
        let membership = Membership {
            store: store.clone(),
            meta,
            name: me.name.clone(),
            advertise: me.advertised().to_owned(),
            heartbeat: Duration::from_millis(me.heartbeat_ms),
            domain: me.domain.clone(),
            copier: Copier::new(store.clone(), endpoint.clone()),
        };
        let membership = tokio::spawn(membership.run());
        let scrubber = Scrubber {
            store: store.clone(),
            bytes_per_sec: me.scrub_bytes_per_sec,
            interval: Duration::from_secs(me.scrub_interval_secs),
        };
        let scrub = tokio::spawn(scrubber.run());
        let storage_metrics = dfs_storaged::metrics::StorageMetrics::default();
        let metrics = dfs_common::metrics::Metrics::new("dfs_storaged");
        storage_metrics.register(&metrics);
        dfs_common::metrics::serve_if_configured(me.metrics_listen.as_deref(), &metrics).await?;
        tokio::spawn(dfs_storaged::server::serve(endpoint.clone(), store, storage_metrics));
        dfs_common::process::shutdown_signal().await;
        tracing::info!("storage daemon {} shutting down", me.name);
        membership.abort();
        scrub.abort();
        endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        anyhow::Ok(())
    })
}
