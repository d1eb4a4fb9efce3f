//! `dfs.toml`: one file describes a cluster and the roles a machine plays in it.
//!
//! Every binary reads it (`--config PATH`, default [`DEFAULT_PATH`]); relative paths inside it
//! are relative to the file's own directory, so a cluster directory can be moved as a whole.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dfs_proto::tls::TlsFiles;
use serde::{Deserialize, Serialize};

pub const DEFAULT_PATH: &str = "/etc/dfs/dfs.toml";
/// Default storage directory fanout: no directory under a data dir holds more entries.
pub const DEFAULT_FANOUT: u32 = 36;
pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;
/// Most copies a piece may have.
pub const MAX_REPLICAS: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write config {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metaserver: Option<MetaserverConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storaged: Vec<StoragedConfig>,
    /// Directory of the config file; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    pub path: PathBuf,
}

/// What every participant must know: the CA and where the metaserver is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub ca_cert: PathBuf,
    /// `host:port` of the metaserver.
    pub metaserver: String,
    /// Name in the metaserver's certificate.
    #[serde(default = "default_metaserver_name")]
    pub metaserver_name: String,
}

fn default_metaserver_name() -> String {
    "metaserver".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetaserverConfig {
    pub listen: String,
    pub db_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A storage daemon silent this long is marked down.
    #[serde(default = "default_heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// Chunk size for a new cluster (fixed once the database exists).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u64,
    /// Pieces a daemon holds that nothing references are deleted once older than this.
    #[serde(default = "default_orphan_piece_grace_secs")]
    pub orphan_piece_grace_secs: u64,
    /// A mount that has not renewed its session for this long loses its open files.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Copies of every piece, unless a directory says otherwise (`user.dfs.replicas`).
    #[serde(default = "default_replicas")]
    pub replicas: u8,
    /// A daemon down this long is declared dead and its pieces are copied elsewhere. Long
    /// enough that a restart or a reboot does not set off a storm of copies.
    #[serde(default = "default_dead_after_secs")]
    pub dead_after_secs: u64,
    /// Pieces are moved between daemons while their stored bytes differ by more than this
    /// percentage of the average (and by more than one chunk).
    #[serde(default = "default_balance_threshold_percent")]
    pub balance_threshold_percent: u64,
    /// Copies (repairs and moves) each daemon makes at once: bounds the rate of healing.
    #[serde(default = "default_copies_per_node")]
    pub copies_per_node: u32,
    /// Serve Prometheus metrics over HTTP on this address (`host:port`, path `/metrics`). Off
    /// unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

fn default_heartbeat_timeout_ms() -> u64 {
    5000
}
fn default_chunk_size() -> u64 {
    DEFAULT_CHUNK_SIZE
}
fn default_orphan_piece_grace_secs() -> u64 {
    3600
}
fn default_session_timeout_ms() -> u64 {
    30_000
}
fn default_replicas() -> u8 {
    1
}
fn default_dead_after_secs() -> u64 {
    600
}
fn default_balance_threshold_percent() -> u64 {
    10
}
fn default_copies_per_node() -> u32 {
    4
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Deadline for one metadata request.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Deadline for establishing a connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Deadline for one data transfer step (a read, or a piece becoming durable).
    #[serde(default = "default_data_timeout_ms")]
    pub data_timeout_ms: u64,
    /// How long the kernel may cache attributes and directory entries.
    #[serde(default = "default_cache_timeout_ms")]
    pub attr_timeout_ms: u64,
    #[serde(default = "default_cache_timeout_ms")]
    pub entry_timeout_ms: u64,
    /// Serve Prometheus metrics over HTTP on this address (`host:port`, path `/metrics`). Off
    /// unless set; `dfs-mount --metrics-listen` overrides it (one address per mount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Threads running the mount's requests. 0 (the default): one thread, so a request and the
    /// network replies it waits for never hop between threads (measured: about half the CPU
    /// and context switches per small file of a 2-worker runtime); more spreads the work of
    /// many parallel streams over cores.
    #[serde(default)]
    pub worker_threads: usize,
}

fn default_request_timeout_ms() -> u64 {
    5000
}
fn default_connect_timeout_ms() -> u64 {
    3000
}
fn default_data_timeout_ms() -> u64 {
    20_000
}
fn default_cache_timeout_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoragedConfig {
    /// Also the name in the daemon's certificate.
    pub name: String,
    pub listen: String,
    /// Address clients use to reach this daemon (defaults to `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Most entries any directory under `data_dir` may hold.
    #[serde(default = "default_fanout")]
    pub fanout: u32,
    /// Limit on stored bytes (0: the whole file system).
    #[serde(default)]
    pub capacity_bytes: u64,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Failure domain (machine, rack): the copies of a piece go to daemons in distinct domains
    /// where there are enough of them. Unset: the daemon is a domain of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Background verification of stored pieces reads at most this many bytes per second.
    #[serde(default = "default_scrub_bytes_per_sec")]
    pub scrub_bytes_per_sec: u64,
    /// A scrub pass over every stored piece starts this long after the previous one began.
    #[serde(default = "default_scrub_interval_secs")]
    pub scrub_interval_secs: u64,
    /// New small pieces are made durable by an append to a journal in `data_dir` (two files of
    /// 8 MiB) rather than by fsyncs of their files and directories. Off: fsyncs only.
    #[serde(default = "default_true")]
    pub journal: bool,
    /// Serve Prometheus metrics over HTTP on this address (`host:port`, path `/metrics`). Off
    /// unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

fn default_fanout() -> u32 {
    DEFAULT_FANOUT
}
fn default_heartbeat_ms() -> u64 {
    1000
}
fn default_scrub_bytes_per_sec() -> u64 {
    32 << 20
}
fn default_true() -> bool {
    true
}
fn default_scrub_interval_secs() -> u64 {
    7 * 24 * 3600
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.path = path.to_owned();
        config.base_dir = path
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
            .unwrap_or_else(|| PathBuf::from("."));
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Writes the config atomically to `path`.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |source| ConfigError::Write {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, self.to_toml()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    fn invalid(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(m) = &self.metaserver {
            if !(1 << 16..=64 << 20).contains(&m.chunk_size) || !m.chunk_size.is_power_of_two() {
                return Err(self.invalid("metaserver.chunk_size must be a power of two between 64 KiB and 64 MiB"));
            }
            if m.heartbeat_timeout_ms < 500 {
                return Err(self.invalid("metaserver.heartbeat_timeout_ms must be at least 500"));
            }
            // A piece may sit written but uncommitted for as long as a mount keeps data back;
            // collecting it sooner would lose acknowledged-to-be writes.
            if m.orphan_piece_grace_secs < 10 {
                return Err(self.invalid("metaserver.orphan_piece_grace_secs must be at least 10"));
            }
            if !(1..=MAX_REPLICAS).contains(&m.replicas) {
                return Err(self.invalid(format!("metaserver.replicas must be between 1 and {MAX_REPLICAS}")));
            }
            if m.copies_per_node == 0 {
                return Err(self.invalid("metaserver.copies_per_node must be at least 1"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.storaged {
            if !(16..=4096).contains(&s.fanout) {
                return Err(self.invalid(format!("storaged {:?}: fanout must be between 16 and 4096", s.name)));
            }
            if !names.insert(&s.name) {
                return Err(self.invalid(format!("storaged {:?} is defined twice", s.name)));
            }
            if s.heartbeat_ms == 0 {
                return Err(self.invalid(format!("storaged {:?}: heartbeat_ms must be positive", s.name)));
            }
            if s.scrub_bytes_per_sec == 0 {
                return Err(self.invalid(format!("storaged {:?}: scrub_bytes_per_sec must be positive", s.name)));
            }
        }
        Ok(())
    }

    /// Resolves a path from the file against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn metaserver(&self) -> Result<&MetaserverConfig, ConfigError> {
        self.metaserver
            .as_ref()
            .ok_or_else(|| self.invalid("no [metaserver] section"))
    }

    pub fn client(&self) -> Result<&ClientConfig, ConfigError> {
        self.client.as_ref().ok_or_else(|| self.invalid("no [client] section"))
    }

    /// The storage daemon called `name`, or the only one if `name` is None.
    pub fn storaged(&self, name: Option<&str>) -> Result<&StoragedConfig, ConfigError> {
        match name {
            Some(name) => self
                .storaged
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| self.invalid(format!("no [[storaged]] entry named {name:?}"))),
            None => match self.storaged.as_slice() {
                [only] => Ok(only),
                [] => Err(self.invalid("no [[storaged]] entry")),
                _ => Err(self.invalid("several [[storaged]] entries: choose one with --name")),
            },
        }
    }

    pub fn tls_files(&self, cert: &Path, key: &Path) -> TlsFiles {
        TlsFiles {
            ca_cert: self.resolve(&self.cluster.ca_cert),
            cert: self.resolve(cert),
            key: self.resolve(key),
        }
    }
}

/// Resolves a `host:port` listen address from the config or the command line.
pub fn listen_addr(addr: &str) -> Result<std::net::SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    let invalid = |message: String| ConfigError::Invalid {
        path: PathBuf::from("listen"),
        message,
    };
    addr.to_socket_addrs()
        .map_err(|e| invalid(format!("invalid listen address {addr:?}: {e}")))?
        .next()
        .ok_or_else(|| invalid(format!("listen address {addr:?} resolves to nothing")))
}

impl ClientConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn data_timeout(&self) -> Duration {
        Duration::from_millis(self.data_timeout_ms)
    }

    pub fn new(cert: PathBuf, key: PathBuf) -> Self {
        ClientConfig {
            cert,
            key,
            request_timeout_ms: default_request_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            data_timeout_ms: default_data_timeout_ms(),
            attr_timeout_ms: default_cache_timeout_ms(),
            entry_timeout_ms: default_cache_timeout_ms(),
            metrics_listen: None,
            worker_threads: 0,
        }
    }
}

impl MetaserverConfig {
    pub fn new(listen: String, db_dir: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        MetaserverConfig {
            listen,
            db_dir,
            cert,
            key,
            heartbeat_timeout_ms: default_heartbeat_timeout_ms(),
            chunk_size: default_chunk_size(),
            orphan_piece_grace_secs: default_orphan_piece_grace_secs(),
            session_timeout_ms: default_session_timeout_ms(),
            replicas: default_replicas(),
            dead_after_secs: default_dead_after_secs(),
            balance_threshold_percent: default_balance_threshold_percent(),
            copies_per_node: default_copies_per_node(),
            metrics_listen: None,
        }
    }
}

impl StoragedConfig {
    pub fn new(name: String, listen: String, data_dir: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        StoragedConfig {
            name,
            listen,
            advertise: None,
            data_dir,
            cert,
            key,
            fanout: DEFAULT_FANOUT,
            capacity_bytes: 0,
            heartbeat_ms: default_heartbeat_ms(),
            domain: None,
            scrub_bytes_per_sec: default_scrub_bytes_per_sec(),
            scrub_interval_secs: default_scrub_interval_secs(),
            journal: true,
            metrics_listen: None,
        }
    }

    pub fn advertised(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[cluster]
ca_cert = "certs/ca.crt"
metaserver = "127.0.0.1:7070"

[metaserver]
listen = "0.0.0.0:7070"
db_dir = "/var/lib/dfs/meta"
cert = "certs/metaserver.crt"
key = "certs/metaserver.key"

[client]
cert = "certs/client.crt"
key = "certs/client.key"

[[storaged]]
name = "storage-1"
listen = "0.0.0.0:7071"
advertise = "10.0.0.1:7071"
data_dir = "/srv/dfs/1"
cert = "certs/storage-1.crt"
key = "certs/storage-1.key"

[[storaged]]
name = "storage-2"
listen = "0.0.0.0:7072"
data_dir = "/srv/dfs/2"
cert = "certs/storage-2.crt"
key = "certs/storage-2.key"
fanout = 100
"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dfs.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn parses_defaults_and_resolves_relative_paths() {
        let (dir, path) = write(SAMPLE);
        let c = Config::load(&path).unwrap();
        assert_eq!(c.cluster.metaserver_name, "metaserver");
        assert_eq!(c.metaserver().unwrap().heartbeat_timeout_ms, 5000);
        assert_eq!(c.storaged(Some("storage-1")).unwrap().fanout, 36);
        assert_eq!(c.storaged(Some("storage-1")).unwrap().advertised(), "10.0.0.1:7071");
        assert_eq!(c.storaged(Some("storage-2")).unwrap().advertised(), "0.0.0.0:7072");
        assert!(c.storaged(None).is_err());
        let tls = c.tls_files(&c.client().unwrap().cert, &c.client().unwrap().key);
        assert_eq!(tls.ca_cert, dir.path().canonicalize().unwrap().join("certs/ca.crt"));
        assert_eq!(c.resolve(Path::new("/abs")), PathBuf::from("/abs"));
    }

    #[test]
    fn round_trips_through_toml() {
        let (_dir, path) = write(SAMPLE);
        let c = Config::load(&path).unwrap();
        let (_dir2, path2) = write(&c.to_toml());
        let mut c2 = Config::load(&path2).unwrap();
        c2.base_dir = c.base_dir.clone();
        c2.path = c.path.clone();
        assert_eq!(c, c2);
    }

    #[test]
    fn rejects_typos_and_bad_values() {
        let (_d, p) = write(&SAMPLE.replace("fanout = 100", "fanuot = 100"));
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
        let (_d, p) = write(&SAMPLE.replace("fanout = 100", "fanout = 4"));
        assert!(matches!(Config::load(&p), Err(ConfigError::Invalid { .. })));
        let (_d, p) = write(&SAMPLE.replace("storage-2", "storage-1"));
        assert!(matches!(Config::load(&p), Err(ConfigError::Invalid { .. })));
    }
}
