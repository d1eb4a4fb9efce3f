//! A cluster directory for running dfs on one machine: certificates, `dfs.toml`, data dirs.
//!
//! ```text
//! DIR/dfs.toml          the config (works with dfs-mount --config and dfs status --config)
//! DIR/certs/            ca.crt, ca.key, metaserver.*, storage-N.*, client.*
//! DIR/meta/             the metaserver's database
//! DIR/storage-N/        each storage daemon's data directory
//! DIR/logs/             process logs written by `dfs up`
//! ```

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};

use dfs_common::config::{ClientConfig, ClusterConfig, Config, ConfigError, MetaserverConfig, StoragedConfig};
use dfs_proto::certs::{self, CertError, PemPair};

pub const CONFIG_FILE: &str = "dfs.toml";
pub const CERTS_DIR: &str = "certs";
pub const METASERVER_NAME: &str = "metaserver";
pub const CLIENT_NAME: &str = "client";

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The default cluster directory: `$XDG_DATA_HOME/dfs` (usually `~/.local/share/dfs`).
pub fn default_dir() -> PathBuf {
    dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("dfs")
}

/// An address on `host` (an IP address) whose port is free right now for both UDP (QUIC) and
/// TCP (the same process's metrics), as `host:port` (`[v6]:port`).
pub fn free_addr(host: &str) -> std::io::Result<String> {
    let ip: std::net::IpAddr = host.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host:?} is not an IP address"),
        )
    })?;
    // Below the kernel's ephemeral range: a port chosen now and bound later by a daemon must not
    // be handed meanwhile to some client's socket (every `dfs status` binds one).
    let (low, _) = ephemeral_range();
    let span = low.saturating_sub(PORT_FLOOR).max(1);
    // Free now is not enough: a port handed out earlier by this process may not be bound yet
    // (the daemons of one cluster, or clusters prepared side by side in one test binary).
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..200u64 {
        let port = PORT_FLOOR + (random(attempt) % span as u64) as u16;
        if port < low
            && !handed_out.contains(&port)
            && UdpSocket::bind((ip, port)).is_ok()
            && TcpListener::bind((ip, port)).is_ok()
        {
            handed_out.insert(port);
            return Ok(std::net::SocketAddr::new(ip, port).to_string());
        }
    }
    let port = UdpSocket::bind((ip, 0))?.local_addr()?.port();
    Ok(std::net::SocketAddr::new(ip, port).to_string())
}

/// Ports `free_addr` handed out in this process.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Lowest port `free_addr` hands out.
const PORT_FLOOR: u16 = 20_000;

/// The kernel's range of automatically assigned ports.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>());
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .unwrap_or((32768, 60999))
}

fn random(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u32(std::process::id());
    h.finish()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io {
        path: path.to_owned(),
        source,
    }
}

fn issue(dir: &Path, ca: &PemPair, name: &str, host: &str) -> Result<(), LocalError> {
    let pair = certs::issue(ca, name, &[host.to_owned()])?;
    certs::write_pair(&dir.join(CERTS_DIR), name, &pair)?;
    Ok(())
}

fn cert_files(name: &str) -> (PathBuf, PathBuf) {
    (
        Path::new(CERTS_DIR).join(format!("{name}.crt")),
        Path::new(CERTS_DIR).join(format!("{name}.key")),
    )
}

/// Loads `DIR/dfs.toml`, creating the whole cluster directory first if it does not exist, and
/// adds storage daemons until there are at least `daemons`. `host` is the IP address every
/// process listens on.
/// Creates (or extends to `daemons` storage daemons) a local cluster directory; `replicas`
/// sets the cluster's default replication factor.
pub fn prepare(dir: &Path, daemons: usize, host: &str, replicas: Option<u8>) -> Result<Config, LocalError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.exists() {
        create(dir, host)?;
    }
    let mut config = Config::load(&config_path)?;
    let ca = certs::read_pair(&dir.join(CERTS_DIR), "ca")?;
    let mut changed = false;
    while config.storaged.len() < daemons {
        let entry = new_storage_daemon(dir, &config, &ca, host)?;
        config.storaged.push(entry);
        changed = true;
    }
    // Metrics are served on loopback clusters (directories made before they were lack it).
    if let Some(m) = config.metaserver.as_mut()
        && m.metrics_listen.is_none()
    {
        m.metrics_listen = Some(m.listen.clone());
        changed = true;
    }
    for s in config.storaged.iter_mut().filter(|s| s.metrics_listen.is_none()) {
        s.metrics_listen = Some(s.listen.clone());
        changed = true;
    }
    if let (Some(r), Some(m)) = (replicas, config.metaserver.as_mut())
        && m.replicas != r
    {
        m.replicas = r;
        changed = true;
    }
    if changed {
        config.save(&config_path)?;
        config = Config::load(&config_path)?;
    }
    Ok(config)
}

fn create(dir: &Path, host: &str) -> Result<(), LocalError> {
    let certs_dir = dir.join(CERTS_DIR);
    let ca = if certs_dir.join("ca.crt").exists() {
        certs::read_pair(&certs_dir, "ca")?
    } else {
        let ca = certs::generate_ca("dfs local cluster CA")?;
        certs::write_pair(&certs_dir, "ca", &ca)?;
        ca
    };
    for name in [METASERVER_NAME, CLIENT_NAME] {
        if !certs::cert_path(&certs_dir, name).exists() {
            issue(dir, &ca, name, host)?;
        }
    }
    let meta_addr = free_addr(host).map_err(io(dir))?;
    let (mcert, mkey) = cert_files(METASERVER_NAME);
    let (ccert, ckey) = cert_files(CLIENT_NAME);
    let config = Config {
        cluster: ClusterConfig {
            ca_cert: Path::new(CERTS_DIR).join("ca.crt"),
            metaserver: meta_addr.clone(),
            metaserver_name: METASERVER_NAME.into(),
        },
        metaserver: Some(MetaserverConfig {
            // Metrics over TCP on the port number of the QUIC listener.
            metrics_listen: Some(meta_addr.clone()),
            ..MetaserverConfig::new(meta_addr, "meta".into(), mcert, mkey)
        }),
        client: Some(ClientConfig::new(ccert, ckey)),
        storaged: vec![],
        base_dir: dir.to_owned(),
        path: dir.join(CONFIG_FILE),
    };
    config.save(&dir.join(CONFIG_FILE))?;
    Ok(())
}

fn new_storage_daemon(dir: &Path, config: &Config, ca: &PemPair, host: &str) -> Result<StoragedConfig, LocalError> {
    let n = (1..)
        .find(|i| !config.storaged.iter().any(|s| s.name == format!("storage-{i}")))
        .expect("some index is free");
    let name = format!("storage-{n}");
    if !certs::cert_path(&dir.join(CERTS_DIR), &name).exists() {
        issue(dir, ca, &name, host)?;
    }
    let (cert, key) = cert_files(&name);
    let listen = free_addr(host).map_err(io(dir))?;
    Ok(StoragedConfig {
        metrics_listen: Some(listen.clone()),
        ..StoragedConfig::new(name.clone(), listen, PathBuf::from(&name), cert, key)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port handed out is not handed out again by the same process, even though nothing
    /// bound it meanwhile (one cluster's daemons are given ports before any of them starts).
    #[test]
    fn free_addr_never_hands_out_a_port_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            let addr = free_addr("127.0.0.1").unwrap();
            assert!(seen.insert(addr.clone()), "{addr} handed out twice");
        }
    }

    #[test]
    fn prepare_creates_then_extends() {
        let dir = tempfile::tempdir().unwrap();
        let c = prepare(dir.path(), 2, "127.0.0.1", None).unwrap();
        assert_eq!(c.storaged.len(), 2);
        assert!(dir.path().join("certs/storage-2.key").exists());
        let c2 = prepare(dir.path(), 3, "127.0.0.1", Some(2)).unwrap();
        assert_eq!(c2.storaged.len(), 3);
        assert_eq!(
            c2.metaserver.as_ref().unwrap().replicas,
            2,
            "dfs up --replicas is kept in the config"
        );
        assert_eq!(c2.cluster.metaserver, c.cluster.metaserver);
        assert_eq!(c2.storaged[0], c.storaged[0]);
        let c3 = prepare(dir.path(), 1, "127.0.0.1", None).unwrap();
        assert_eq!(c3.storaged.len(), 3, "existing daemons are kept");
    }
}
