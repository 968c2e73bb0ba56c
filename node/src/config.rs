//! The data folder of a node: key, API token, config file, store.
//!
//! ```text
//! DIR/identity.key   32-byte ed25519 secret, hex (mode 0600)
//! DIR/api-token      bearer token for the HTTP API (mode 0600)
//! DIR/config.toml    commented settings (listen, api, bootstrap, mdns, fetch)
//! DIR/store/         sled database
//! ```
//! Owns: creating and reading these files. Must not: start anything.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use cofab_protocol::{Keypair, Kind};
use serde::Deserialize;

/// Errors of the data folder.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An identity already exists.
    #[error("{0} already holds an identity; refusing to overwrite it")]
    Exists(PathBuf),
    /// Missing file.
    #[error("{0} not found: run `cofab init --data-dir DIR --name NAME` first")]
    Missing(PathBuf),
    /// Bad file content.
    #[error("{path}: {msg}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// IO.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Settings from `config.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Enterprise display name.
    pub name: String,
    /// libp2p listen addresses.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// HTTP API address.
    #[serde(default = "default_api")]
    pub api: String,
    /// Bootstrap peers.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// mDNS discovery on the LAN.
    #[serde(default = "default_true")]
    pub mdns: bool,
    /// Public document kinds not to fetch (`order`, `capacity`, `design`).
    #[serde(default)]
    pub refuse_kinds: Vec<Kind>,
    /// Enterprises whose security alerts this node acts on (their reported peers are banned).
    #[serde(default)]
    pub trust_alerts_from: Vec<cofab_protocol::EnterpriseId>,
}

fn default_listen() -> Vec<String> {
    vec![
        "/ip4/0.0.0.0/tcp/4001".into(),
        "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
    ]
}
fn default_api() -> String {
    "127.0.0.1:8080".into()
}
fn default_true() -> bool {
    true
}

/// Paths inside a data folder.
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// The key file.
    pub fn key_file(&self) -> PathBuf {
        self.0.join("identity.key")
    }
    /// The API token file.
    pub fn token_file(&self) -> PathBuf {
        self.0.join("api-token")
    }
    /// The config file.
    pub fn config_file(&self) -> PathBuf {
        self.0.join("config.toml")
    }
    /// The store folder.
    pub fn store_dir(&self) -> PathBuf {
        self.0.join("store")
    }

    /// Creates a new identity, token and config. Refuses if an identity exists.
    pub fn init(&self, name: &str, secret: [u8; 32], token: &str) -> Result<Keypair, ConfigError> {
        if self.key_file().exists() {
            return Err(ConfigError::Exists(self.0.clone()));
        }
        fs::create_dir_all(&self.0)?;
        write_private(&self.key_file(), &hex(&secret))?;
        write_private(&self.token_file(), token)?;
        let cfg = format!(
            r#"# cofab node configuration. Command-line flags override these values.

# Display name of your enterprise (shown to peers and in the console).
name = {name:?}

# libp2p listen addresses: TCP and QUIC on all interfaces, port 4001.
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]

# HTTP API and web console. Keep it on 127.0.0.1 unless you put TLS in front.
api = "127.0.0.1:8080"

# Peers beyond the LAN, e.g. "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW...".
bootstrap = []

# Find peers on the local network with mDNS.
mdns = true

# Public document kinds this node does not fetch when offered: "order", "capacity", "design".
refuse_kinds = []

# Enterprise ids (cf1...) whose security alerts you trust: a peer they report is banned here too.
trust_alerts_from = []
"#
        );
        fs::write(self.config_file(), cfg)?;
        Ok(Keypair::from_secret(secret))
    }

    /// Reads the key.
    pub fn key(&self) -> Result<Keypair, ConfigError> {
        let p = self.key_file();
        let s = fs::read_to_string(&p).map_err(|_| ConfigError::Missing(p.clone()))?;
        let bytes = unhex(s.trim()).ok_or_else(|| ConfigError::Invalid {
            path: p.clone(),
            msg: "expected 64 hex characters".into(),
        })?;
        let secret: [u8; 32] = bytes.try_into().map_err(|_| ConfigError::Invalid {
            path: p,
            msg: "expected 32 bytes".into(),
        })?;
        Ok(Keypair::from_secret(secret))
    }

    /// Reads the API token.
    pub fn token(&self) -> Result<String, ConfigError> {
        let p = self.token_file();
        Ok(fs::read_to_string(&p)
            .map_err(|_| ConfigError::Missing(p))?
            .trim()
            .to_string())
    }

    /// Reads the config file.
    pub fn config(&self) -> Result<FileConfig, ConfigError> {
        let p = self.config_file();
        let s = fs::read_to_string(&p).map_err(|_| ConfigError::Missing(p.clone()))?;
        toml::from_str(&s).map_err(|e| ConfigError::Invalid {
            path: p,
            msg: e.to_string(),
        })
    }
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// 32 random bytes from the OS.
pub fn random_secret() -> [u8; 32] {
    let mut s = [0u8; 32];
    rand::fill(&mut s);
    s
}
