//! custody's network front: TLS 1.3 (rustls, mTLS), the AWS KMS JSON protocol, `/healthz`, and
//! the background scheduler.
//!
//! Nothing here decides who may do what or touches key material: a request is authenticated
//! (the client certificate's URI SAN), translated, and handed to [`custody_kms::Kms`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod audit_file;
mod certificates;
pub mod config;
pub mod keyfile;
pub mod metrics;
pub mod output;
pub mod process;
pub mod protocol;
pub mod sigv4;
pub mod tls;
mod watchdog;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use custody_kms::{Kms, KmsConfig};
use custody_store::Backend;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub use config::ServerConfig;
use protocol::{ApiError, Identity};

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The AWS JSON 1.1 content type.
const AMZ_JSON: &str = "application/x-amz-json-1.1";

/// Writes `bytes` to a new temporary file beside `path` with `mode`, syncs it, and renames it
/// over `path`: a reader sees the old file or the new one, never half of one, and a secret is
/// never readable by others, not even while being written.
pub fn write_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = AtomicFile::create(path, Some(mode))?;
    file.write_all(bytes)?;
    file.commit()
}

/// Flushes the directory holding `path` to the disk, so that a file just created or renamed
/// there is still found after a crash (a file's own fsync does not cover its directory entry).
pub fn sync_parent(path: &std::path::Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// What an output path names, for a writer that would stage a file and rename it onto the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputTarget {
    /// Nothing yet, or a regular file (or a link to one): staged and renamed into place.
    File,
    /// This process's file descriptor N (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`, or a link
    /// to one): written to that descriptor, never replaced.
    Descriptor(u32),
    /// Something else that exists (a device such as `/dev/null`, a pipe, a directory): written
    /// in place if at all, never replaced.
    Special,
}

/// What `dest` names (see [`OutputTarget`]).
pub fn output_target(dest: &std::path::Path) -> OutputTarget {
    fn descriptor(p: &std::path::Path) -> Option<u32> {
        let s = p.to_str()?;
        match s {
            "/dev/stdin" => Some(0),
            "/dev/stdout" => Some(1),
            "/dev/stderr" => Some(2),
            _ => ["/dev/fd/", "/proc/self/fd/", "/proc/thread-self/fd/"]
                .iter()
                .find_map(|prefix| s.strip_prefix(prefix))
                .and_then(|n| n.parse().ok()),
        }
    }
    // The path itself, then each link it is (a link to /dev/stdout, say), a few hops at most.
    let mut hop = dest.to_path_buf();
    for _ in 0..8 {
        if let Some(n) = descriptor(&hop) {
            return OutputTarget::Descriptor(n);
        }
        match std::fs::read_link(&hop) {
            Ok(target) => hop = hop.parent().map_or(target.clone(), |parent| parent.join(&target)),
            Err(_) => break,
        }
    }
    match std::fs::metadata(dest) {
        Ok(meta) if !meta.is_file() => OutputTarget::Special,
        _ => OutputTarget::File,
    }
}

/// A file written under a temporary name beside its destination (created new, never an existing
/// file), and renamed onto the destination by [`AtomicFile::commit`] after an fsync: a reader
/// sees the old file or the whole new one. Dropped before the commit, the temporary file is
/// removed. The one mechanism behind [`write_file`] and the CLI's streamed outputs.
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<std::fs::File>,
    tmp: std::path::PathBuf,
    dest: std::path::PathBuf,
}

impl AtomicFile {
    /// Starts writing `dest`. With `mode`, the file has those permissions before any byte is
    /// written; without, the process's default (umask) applies. A `dest` that is not an
    /// [`OutputTarget::File`] (a device such as `/dev/null`, a pipe, a directory, a descriptor
    /// such as `/dev/stdout`) is refused: renaming onto it would replace it.
    pub fn create(dest: &std::path::Path, mode: Option<u32>) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        if output_target(dest) != OutputTarget::File {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a regular file (a device, a pipe, a directory or a descriptor such as /dev/stdout) and is not replaced",
                    dest.display()
                ),
            ));
        }
        let name = dest.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = dest
            .with_file_name(format!(".{name}.custody-{:016x}", u64::from_be_bytes(custody_crypto::random::array())));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let staged = Self { file: Some(file), tmp, dest: dest.to_path_buf() };
        if let Some(mode) = mode {
            staged.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        Ok(staged)
    }

    /// The temporary file (to set permissions, say).
    pub fn as_file(&self) -> &std::fs::File {
        self.file.as_ref().expect("open until committed")
    }

    /// Syncs the file, renames it onto the destination and syncs the directory (the rename
    /// itself survives a crash only once the directory is on the disk).
    pub fn commit(mut self) -> std::io::Result<()> {
        let file = self.file.take().expect("open until committed");
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.dest)?;
        self.tmp = std::path::PathBuf::new();
        sync_parent(&self.dest)
    }
}

impl std::io::Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("open until committed").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("open until committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// TLS files problem.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Store problem.
    #[error("{0}")]
    Store(String),
    /// Cannot listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// address
        addr: SocketAddr,
        /// cause
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    kms: Arc<Kms>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Opens the store, unseals with the key file if so configured, and starts serving.
    pub async fn start(config: ServerConfig) -> Result<Self, StartError> {
        let backend: Arc<dyn Backend> = config.open_backend().map_err(StartError::Store)?;
        let day_ms = i64::try_from(config.danger_day_length_ms).unwrap_or(custody_kms::DAY_MS);
        if day_ms != custody_kms::DAY_MS {
            tracing::warn!(
                day_ms,
                "danger_day_length_ms is set: deletion windows and rotation periods are shortened (tests only)"
            );
        }
        if config.danger_disable_audit {
            tracing::error!("danger_disable_audit is set: NO audit records are written (benchmarks only)");
        }
        let kms = Arc::new(
            Kms::open(
                backend,
                KmsConfig {
                    region: config.region.clone(),
                    day_ms,
                    audit_checkpoint_every: config.audit_checkpoint_every,
                    audit_retain_days: config.audit_retain_days,
                    audit_retain_records: config.audit_retain_records,
                    separation_of_duties: match config.separation_of_duties.as_str() {
                        "warn" => custody_kms::SeparationOfDuties::Warn,
                        _ => custody_kms::SeparationOfDuties::Enforce,
                    },
                    danger_disable_audit: config.danger_disable_audit,
                    audit_group_wait: Duration::from_micros(config.audit_group_wait_us),
                    default_key_policy: match config.default_key_policy.as_str() {
                        "tenant" => custody_kms::DefaultKeyPolicy::Tenant,
                        _ => custody_kms::DefaultKeyPolicy::KeyAdminsOnly,
                    },
                    key_usage_limit: config.key_usage_limit,
                },
            )
            .map_err(|e| StartError::Store(e.to_string()))?,
        );
        // The store knows how it is sealed; the setting may only confirm it or move the key file.
        let stored = kms.key_file_seal().map_err(|e| StartError::Store(e.to_string()))?;
        let pkcs11 = kms.pkcs11_seal().map_err(|e| StartError::Store(e.to_string()))?;
        let setting = config.seal_setting()?;
        let key_file = match (stored, setting.clone()) {
            (None, None | Some(config::SealSetting::Shamir)) => None,
            (None, Some(config::SealSetting::Pkcs11)) if pkcs11.is_some() => None,
            (None, Some(config::SealSetting::KeyFile(_))) if pkcs11.is_some() => {
                return Err(StartError::Store(
                    "this store is sealed with a PKCS#11 token, not a key file: remove the keyfile seal setting".into(),
                ))
            }
            (None, Some(config::SealSetting::KeyFile(_))) => {
                return Err(StartError::Store(
                    "this store is sealed with Shamir shares, not a key file: remove the keyfile seal setting and unseal with `custody unseal`".into(),
                ))
            }
            (None, Some(config::SealSetting::Pkcs11)) => {
                return Err(StartError::Store(
                    "this store is sealed with Shamir shares, not a PKCS#11 token: remove the pkcs11 seal setting, or move it to a token with `custody seal migrate --to pkcs11`".into(),
                ))
            }
            (Some(_), Some(config::SealSetting::Shamir | config::SealSetting::Pkcs11)) => {
                return Err(StartError::Store(
                    "this store is sealed with a key file, not Shamir shares: set seal = \"keyfile:PATH\" (or remove the setting)".into(),
                ))
            }
            (Some(_), Some(config::SealSetting::KeyFile(path))) => Some(path),
            (Some(Some(recorded)), None) => Some(std::path::PathBuf::from(recorded)),
            (Some(None), None) => {
                return Err(StartError::Store("this store is sealed with a key file: set seal = \"keyfile:PATH\"".into()))
            }
        };
        if let Some(path) = key_file {
            tracing::warn!(path = %path.display(), "key-file seal: for development only");
            let root = keyfile::read(&path).map_err(StartError::Store)?;
            kms.unseal_with_root(root)
                .map_err(|e| StartError::Store(format!("the key file does not unseal this store: {e}")))?;
        }
        if let Some(seal) = pkcs11 {
            if setting == Some(config::SealSetting::Shamir) {
                tracing::warn!("seal = \"shamir\": not using the PKCS#11 token; unseal with the recovery shares");
            } else {
                auto_unseal(&kms, seal, &config).await;
            }
        }
        if let Some(path) = &config.audit_file {
            let file = audit_file::AuditFile::open(path, config.audit_file_max_bytes)
                .map_err(|e| StartError::Store(format!("cannot open the audit file {}: {e}", path.display())))?;
            kms.set_audit_sink(Box::new(move |records| file.write(records)));
        }
        let served = tls::ServedCert::new(tls::load_files(&config.cert_file(), &config.key_file())?);
        let revoked: tls::RevocationCheck = {
            let k = kms.clone();
            Arc::new(move |serial: &str| k.is_revoked(serial))
        };
        let trust = tls::ClientTrust::new(&config.client_ca_file(), revoked)?;
        let tls = tls::server_config(served.clone(), trust.clone())?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let metrics = metrics::Metrics::new();
        {
            let m = metrics.clone();
            kms.set_audit_observer(Box::new(move |took, records| m.audit_commit(took, records)));
        }
        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                metrics::check_listen(&addr).map_err(|e| StartError::Config(config::ConfigError(e)))?;
                let l = TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
                let bound = l.local_addr().map_err(|source| StartError::Listen { addr, source })?;
                tokio::spawn(metrics::serve(l, metrics.clone(), kms.clone(), served.clone(), shutdown_rx.clone()));
                tracing::info!(%bound, "metrics at http://{bound}/metrics (loopback only)");
                Some(bound)
            }
            None => None,
        };
        let state = Arc::new(State {
            kms: kms.clone(),
            node: config.node_name(),
            max_request_bytes: config.max_request_bytes,
            request_read_timeout: Duration::from_millis(config.request_read_timeout_ms),
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
            metrics: metrics.clone(),
        });
        let every = Duration::from_millis(config.scheduler_interval_ms);
        let k = kms.clone();
        tokio::spawn(periodic(
            "retention",
            every,
            metrics.clone(),
            shutdown_rx.clone(),
            move || k.prune_audit(),
            |_| {},
        ));
        let k = kms.clone();
        let m = metrics.clone();
        tokio::spawn(periodic(
            "scheduler",
            every,
            metrics.clone(),
            shutdown_rx.clone(),
            move || k.run_due_work(),
            move |r| {
                m.key_counts(r.keys_by_state);
                if r.rotated + r.destroyed > 0 {
                    tracing::info!(rotated = r.rotated, destroyed = r.destroyed, "scheduler pass");
                }
            },
        ));
        certificates::spawn(&config, kms.clone(), served, trust, metrics.clone(), shutdown_rx.clone());
        let k = kms.clone();
        tokio::spawn(periodic(
            "key usage",
            Duration::from_secs(1),
            metrics.clone(),
            shutdown_rx.clone(),
            move || match k.flush_usage() {
                Err(custody_kms::KmsError::Sealed) => Ok(Default::default()),
                other => other,
            },
            |_| {},
        ));
        let k = kms.clone();
        tokio::spawn(periodic(
            "root rotation",
            Duration::from_millis(200),
            metrics.clone(),
            shutdown_rx.clone(),
            move || k.continue_root_rotation(Duration::from_millis(100)),
            |_| {},
        ));
        let k = kms.clone();
        let every = Duration::from_millis(config.audit_checkpoint_interval_ms);
        tokio::spawn(periodic(
            "audit checkpoint",
            every,
            metrics.clone(),
            shutdown_rx.clone(),
            move || k.audit_checkpoint(),
            |_| {},
        ));
        let task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(tls), state, shutdown_rx));
        tracing::info!(%local_addr, "custody listening (TLS 1.3)");
        Ok(Self { local_addr, metrics_addr, kms, shutdown, task })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `GET /metrics` is served, if `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The service behind this server.
    pub fn kms(&self) -> &Arc<Kms> {
        &self.kms
    }

    /// Stops accepting, lets in-flight requests finish (up to 10 s), and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        // Encryption counts since the last periodic flush.
        if let Err(e) = self.kms.flush_usage() {
            tracing::debug!(error = %e, "usage counts not flushed at shutdown");
        }
    }
}

/// Opens the PKCS#11 token of `seal` with the server's settings (module override, PIN file).
fn open_token(seal: &custody_kms::Pkcs11Seal, settings: &config::Pkcs11Settings) -> Result<custody_hsm::Hsm, String> {
    let module = settings.module.clone().unwrap_or_else(|| std::path::PathBuf::from(&seal.module));
    let pin_file = settings.pin_file.as_ref().ok_or("no PIN: set pkcs11.pin_file (CUSTODY_PKCS11_PIN_FILE)")?;
    let pin = custody_crypto::SecretBytes::new(
        std::fs::read(pin_file).map_err(|e| format!("cannot read the PIN file {}: {e}", pin_file.display()))?,
    );
    let config = custody_hsm::HsmConfig {
        module,
        token_label: seal.token_label.clone(),
        key_label: seal.key_label.clone(),
        pin,
    };
    custody_hsm::Hsm::open(&config, false).map_err(|e| e.to_string())
}

/// Unwraps the root key with the PKCS#11 token and unseals. On failure the server stays sealed
/// and says why and what to do; it still starts, so that recovery shares can be submitted. Also
/// installs how a root rotation has the token wrap the new root key.
async fn auto_unseal(kms: &Arc<Kms>, seal: custody_kms::Pkcs11Seal, config: &ServerConfig) {
    let settings = config.pkcs11.clone();
    kms.set_root_wrapper(Box::new(move |seal, root| {
        open_token(seal, &settings)?.wrap(root.expose_secret(), custody_kms::PKCS11_WRAP_AAD).map_err(|e| e.to_string())
    }));
    let settings = config.pkcs11.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<custody_crypto::RootKey, String> {
        let hsm = open_token(&seal, &settings)?;
        let root = hsm.unwrap(&seal.wrapped_root, custody_kms::PKCS11_WRAP_AAD).map_err(|e| e.to_string())?;
        custody_crypto::RootKey::from_bytes(root.expose_secret())
            .ok_or_else(|| "the unwrapped root key is not 32 bytes".into())
    })
    .await
    .unwrap_or_else(|e| Err(format!("the PKCS#11 task failed: {e}")));
    match opened.and_then(|root| kms.unseal_with_root(root).map_err(|e| e.to_string())) {
        Ok(()) => tracing::info!("unsealed with the PKCS#11 token"),
        Err(why) => tracing::error!(
            error = %why,
            "PKCS#11 auto-unseal failed: the server stays sealed. Fix it and restart, or unseal with the recovery shares: custody unseal --recovery"
        ),
    }
}

struct State {
    kms: Arc<Kms>,
    node: String,
    max_request_bytes: usize,
    /// See `watchdog`.
    request_read_timeout: Duration,
    /// Connections (handshakes included) open at once, at most.
    max_connections: usize,
    /// Of those, from one IP address.
    max_connections_per_ip: usize,
    metrics: Arc<metrics::Metrics>,
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    // Open connections per address, and each connection's task's address (to count it out
    // however the task ends).
    let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
    let mut task_ip: HashMap<tokio::task::Id, IpAddr> = HashMap::new();
    let mut warned: Option<Instant> = None;
    let mut warn = |peer: SocketAddr, why: &str| {
        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            warned = Some(Instant::now());
            tracing::warn!(%peer, "connection refused: {why} (logged at most every 10 s)");
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                // Closed at once: a client sees a refused connection instead of a handshake that
                // never finishes, and memory stays bounded whoever opens connections.
                Ok((tcp, peer)) if connections.len() >= state.max_connections => {
                    drop(tcp);
                    state.metrics.connection_refused();
                    warn(peer, "max_connections are open (custody_connections_refused_total)");
                }
                Ok((tcp, peer)) if per_ip.get(&peer.ip().to_canonical()).is_some_and(|n| *n >= state.max_connections_per_ip) => {
                    drop(tcp);
                    state.metrics.connection_refused_per_ip();
                    warn(peer, "max_connections_per_ip are open from this address (custody_connections_refused_per_ip_total)");
                }
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let ip = peer.ip().to_canonical();
                    *per_ip.entry(ip).or_default() += 1;
                    let task = connections.spawn(connection(tcp, peer, acceptor.clone(), state.clone(), shutdown.clone()));
                    task_ip.insert(task.id(), ip);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(ended) = connections.join_next_with_id(), if !connections.is_empty() => {
                let id = match ended {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                if let Some(ip) = task_ip.remove(&id) {
                    if let std::collections::hash_map::Entry::Occupied(mut open) = per_ip.entry(ip) {
                        *open.get_mut() -= 1;
                        if *open.get() == 0 {
                            open.remove();
                        }
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("shutdown: connections still open after the drain timeout; closing them");
        connections.abort_all();
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake refused");
            state.metrics.handshake_failed();
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            state.metrics.handshake_failed();
            return;
        }
    };
    // Counted as closed however this function ends.
    let _open = OpenConnection::new(state.metrics.clone());
    let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match tls::identity_of(cert) {
            Some(uri) => Identity::Certificate { uri, serial: tls::serial_of(cert).unwrap_or_default() },
            None => Identity::CertificateWithoutIdentity,
        },
        None => Identity::Anonymous,
    };
    let client = Arc::new(Client { peer, peer_text: peer.to_string(), identity, progress: watchdog::Progress::new() });
    let service = {
        let (state, client) = (state.clone(), client.clone());
        hyper::service::service_fn(move |req| {
            let (state, client) = (state.clone(), client.clone());
            async move { Ok::<_, Infallible>(handle(state, client, req).await) }
        })
    };
    // No hyper timer: the watchdog below bounds the whole request, body included.
    let io = TokioIo::new(tls);
    // An answer's body is wiped when hyper drops it (protocol::Answer); that leaves no copy only
    // because hyper queues the body's bytes for a stream that writes vectored, where it would
    // otherwise copy them into its own buffer (SECURITY.md "Memory"). Every test request checks it.
    debug_assert!(hyper::rt::Write::is_write_vectored(&io), "hyper would copy answers into its own buffer");
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = watchdog::watchdog(&client.progress, state.request_read_timeout) => {
            // Dropping the connection closes it, with whatever request it had begun.
            tracing::info!(%peer, "closed a connection that did not deliver a request within request_read_timeout_ms");
            state.metrics.request_read_timed_out();
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// What a request knows of its connection, made once per connection.
struct Client {
    peer: SocketAddr,
    /// `peer` as the audit records it (formatting it per request cost ~1.5k instructions).
    peer_text: String,
    identity: Identity,
    progress: watchdog::Progress,
}

/// One open TLS connection, for `custody_connections_open`.
struct OpenConnection(Arc<metrics::Metrics>);

impl OpenConnection {
    fn new(metrics: Arc<metrics::Metrics>) -> Self {
        metrics.connection(true);
        Self(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection(false);
    }
}

async fn handle(state: Arc<State>, client: Arc<Client>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (identity, progress, peer) = (&client.identity, &client.progress, client.peer);
    let started = Instant::now();
    let arrival = state.kms.audit_arrival();
    // From aws-lc's generator, as every other random value here: `new_v4` asks the kernel
    // (a getrandom system call per request, 2 % of the server's CPU on Encrypt).
    let request_id = uuid::Builder::from_random_bytes(custody_crypto::random::array()).into_uuid().to_string();
    let (base, dispatched) = route(&state, &client, &request_id, req).await;
    // Received (also when it was refused before its body was read): from here on it is served.
    progress.serving();
    let action = base.action.clone();
    let protocol::Dispatched { result, principal: auth_principal, access_key_id, recorded, hints } = dispatched;
    // A state change already committed its record with it.
    let audited = if action == "healthz" || recorded.is_some() {
        drop(arrival);
        Ok(())
    } else {
        let event = finish_event(base, &hints, &result, auth_principal.clone(), access_key_id.clone(), started);
        let kms = state.kms.clone();
        // Wait for the audit thread to make the record durable, without holding a thread.
        let (tx, rx) = tokio::sync::oneshot::channel();
        kms.submit_audit(arrival, event, hints.contexts(), Box::new(move |r| drop(tx.send(r))));
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            // While sealed only status and unseal are answered, and only the log can record them.
            // Anything else that got a result (the node sealed itself while serving it) is
            // refused like any request whose record could not be written.
            Ok(Err(e))
                if protocol::unrecorded_while_sealed(&action, result.is_ok())
                    && kms.status().is_ok_and(|s| s.sealed) =>
            {
                tracing::debug!(error = %e, "request while sealed: recorded in the log only");
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the audit thread stopped".into()),
        }
    };
    // For the metrics: what the answer will say, and a label from custody's own list.
    let code = match (&audited, &result) {
        (Err(_), _) => Some("ServiceUnavailableException"),
        (Ok(()), Err(e)) => Some(e.code),
        (Ok(()), Ok(_)) => None,
    };
    let label = metric_action(&action, auth_principal.is_some(), code);
    let (status, body) = match (audited, result) {
        // Fail closed: a request whose record cannot be written gets no answer but this one.
        (Err(why), _) => {
            tracing::error!(%request_id, action = %action, error = %why, "audit record could not be written; answering 503");
            let e = ApiError::new(
                503,
                "ServiceUnavailableException",
                "The audit trail cannot be written, so the request was not answered; retry later.",
            );
            (e.status, protocol::Answer::new(e.body()))
        }
        (Ok(()), Ok(v)) => (200, v),
        (Ok(()), Err(e)) => {
            if e.status >= 500 {
                let detail = e.detail.as_deref().unwrap_or("");
                tracing::error!(%request_id, action = %action, code = e.code, detail, "request failed");
            }
            (e.status, protocol::Answer::new(e.body()))
        }
    };
    let principal = match (&auth_principal, identity) {
        (Some(arn), _) => arn.as_str(),
        (None, Identity::Certificate { uri, .. }) => uri.as_str(),
        (None, Identity::CertificateWithoutIdentity) => "<certificate without identity>",
        (None, Identity::Anonymous) => "-",
    };
    let access_key_id = access_key_id.as_deref().unwrap_or("-");
    let took = started.elapsed();
    progress.answered(started + took);
    state.metrics.request(label, outcome_of(code), took);
    let ms = took.as_millis() as u64;
    // Every request is in the audit trail already; the log repeats only those that failed (at
    // `debug`, every request: RUST_LOG=custody_server=debug).
    if status == 200 {
        tracing::debug!(%request_id, %peer, principal, access_key_id, action = %action, status, ms, "request");
    } else {
        tracing::info!(%request_id, %peer, principal, access_key_id, action = %action, status, ms, "request");
    }
    let mut resp = Response::new(Full::new(body.into_bytes()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(AMZ_JSON));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("x-amzn-requestid", v);
    }
    // A connection whose client certificate was revoked is closed after this answer: its
    // requests are refused anyway, and a client that has a renewed certificate reconnects with it.
    if let Identity::Certificate { serial, .. } = identity {
        if state.kms.is_revoked(serial) {
            headers.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    resp
}

/// Reads the request and runs it: the audit event so far (its `action` is the operation), and
/// what dispatch produced.
async fn route(
    state: &Arc<State>,
    client: &Arc<Client>,
    request_id: &str,
    req: Request<Incoming>,
) -> (custody_kms::AuditEvent, protocol::Dispatched) {
    let base = |action: &str| base_event(request_id, &client.peer_text, &client.identity, action, &state.node);
    if req.uri().path() == "/healthz" && req.method() == Method::GET {
        return (base("healthz"), protocol::Dispatched::answered(health(&state.kms)));
    }
    if req.method() != Method::POST || req.uri().path() != "/" {
        let e = ApiError::new(
            404,
            "UnknownOperationException",
            "custody answers POST / (AWS JSON protocol) and GET /healthz",
        );
        return (base("-"), protocol::Dispatched::refused(e));
    }
    let target = req.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).map(|t| protocol::first_chars(t, 128));
    let Some(target) = target else {
        let e = ApiError::new(400, "UnknownOperationException", "missing X-Amz-Target header");
        return (base("-"), protocol::Dispatched::refused(e));
    };
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with(AMZ_JSON) && !content_type.starts_with("application/json") {
        let e = ApiError::new(400, "SerializationException", format!("Content-Type must be {AMZ_JSON}"));
        return (base(&target), protocol::Dispatched::refused(e));
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, state.max_request_bytes).collect().await {
        Ok(b) => {
            client.progress.serving();
            b.to_bytes()
        }
        Err(_) => {
            let msg = format!("the request body is larger than {} bytes or was cut off", state.max_request_bytes);
            return (base(&target), protocol::Dispatched::refused(ApiError::new(413, "ValidationException", msg)));
        }
    };
    let event = base(&target);
    let (kms, client, audit) = (state.kms.clone(), client.clone(), event.clone());
    let run = move || {
        let req = sigv4::RequestParts {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &parts.headers,
            body: &body,
        };
        protocol::dispatch(&kms, &client.identity, &req, &audit.action.clone(), audit, client.peer.ip())
    };
    if protocol::runs_inline(&target) {
        return (event, run());
    }
    let dispatched = tokio::task::spawn_blocking(run).await.unwrap_or_else(|_| {
        protocol::Dispatched::refused(ApiError::new(
            500,
            "KMSInternalException",
            "The request could not be completed because of an internal error.",
        ))
    });
    (event, dispatched)
}

/// What is known of a request before it runs. A state change commits with this (completed by
/// the service); otherwise [`finish_event`] completes it after the answer is known.
fn base_event(request_id: &str, peer: &str, identity: &Identity, action: &str, node: &str) -> custody_kms::AuditEvent {
    custody_kms::AuditEvent {
        time: custody_kms::model::now_ms(),
        request_id: request_id.to_string(),
        node: node.to_string(),
        source: peer.to_string(),
        tls_identity: match identity {
            Identity::Certificate { uri, .. } => Some(uri.clone()),
            Identity::CertificateWithoutIdentity => Some("<certificate without identity>".into()),
            Identity::Anonymous => None,
        },
        principal: None,
        access_key_id: None,
        action: action.to_string(),
        key_id: None,
        key_version: None,
        encryption_context: None,
        source_key_id: None,
        source_key_version: None,
        source_encryption_context: None,
        outcome: custody_kms::Outcome::Success,
        error_code: None,
        detail: None,
        duration_ms: 0,
        alert: false,
    }
}

/// Completes a request's event with how it ended and the keys it named or used.
fn finish_event(
    base: custody_kms::AuditEvent,
    hints: &protocol::AuditHints,
    result: &Result<protocol::Answer, ApiError>,
    principal: Option<String>,
    access_key_id: Option<String>,
    started: Instant,
) -> custody_kms::AuditEvent {
    use custody_kms::Outcome;
    let (outcome, error_code, detail, resolved, resolved_source) = match result {
        Ok(answer) => {
            let v = answer.value();
            // Prefer the keys the service resolved (ARNs) over what the caller typed.
            let arn = |v: Option<&serde_json::Value>| v.and_then(|k| k.as_str()).map(str::to_string);
            let key = arn(v.get("KeyId").or_else(|| v.get("KeyMetadata").and_then(|m| m.get("Arn"))));
            (Outcome::Success, None, None, key, arn(v.get("SourceKeyId")))
        }
        Err(e) => (outcome_of(Some(e.code)), Some(e.code.to_string()), e.detail.clone(), None, None),
    };
    let named = hints.name_keys(base);
    custody_kms::AuditEvent {
        principal,
        access_key_id,
        key_id: resolved.or(named.key_id),
        source_key_id: resolved_source.or(named.source_key_id),
        alert: is_alert(&named.action, outcome, error_code.as_deref()),
        outcome,
        error_code,
        detail,
        duration_ms: started.elapsed().as_millis() as u64,
        ..named
    }
}

/// How a request that got `code` (`None`: answered 200) ended, for its audit record and metrics.
fn outcome_of(code: Option<&str>) -> custody_kms::Outcome {
    use custody_kms::Outcome;
    match code {
        None => Outcome::Success,
        Some("MissingAuthenticationTokenException" | "UnrecognizedClientException") => Outcome::Unauthenticated,
        Some("AccessDeniedException") => Outcome::Denied,
        Some(_) => Outcome::Failed,
    }
}

/// The `action` label of a request's metrics. The target is the client's text, so it is used
/// only once custody has recognized it: answered, or refused by an action that exists after the
/// caller authenticated (an unknown action is refused as `UnknownOperationException`). Anything
/// else counts as `other`, so no client can create series at will.
fn metric_action<'a>(action: &'a str, authenticated: bool, code: Option<&str>) -> &'a str {
    let recognized = match code {
        None => true,
        Some("UnknownOperationException") => false,
        Some(_) => authenticated,
    };
    if action == "healthz" || (recognized && (action.starts_with("TrentService.") || action.starts_with("Custody."))) {
        action
    } else {
        "other"
    }
}

/// Health for load balancers: 200 when serving; "degraded" (503) when the audit trail cannot
/// be written, since every request is then refused.
fn health(kms: &Kms) -> Result<serde_json::Value, ApiError> {
    let audit = kms.audit_health();
    let version = env!("CARGO_PKG_VERSION");
    let body = match kms.status() {
        Ok(s) => serde_json::json!({
            "status": if audit.failing { "degraded" } else { "ok" },
            "sealed": s.sealed,
            "audit": if audit.disabled { "DISABLED (danger_disable_audit)" } else if audit.failing { "failing" } else { "ok" },
            "alerts": audit.alerts,
            "version": version,
        }),
        Err(_) => serde_json::json!({ "status": "error", "sealed": true, "version": version }),
    };
    if audit.failing {
        let mut e = ApiError::new(503, "ServiceUnavailableException", "the audit trail cannot be written");
        e.detail = Some(body.to_string());
        return Err(e);
    }
    Ok(body)
}

/// Records worth a human's attention (DESIGN.md §5, §7).
fn is_alert(action: &str, outcome: custody_kms::Outcome, error_code: Option<&str>) -> bool {
    use custody_kms::Outcome;
    let uses_key = [
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateMac",
        "VerifyMac",
    ]
    .iter()
    .any(|a| action.strip_prefix("TrentService.") == Some(*a));
    match (outcome, error_code) {
        (Outcome::Unauthenticated, _) => true,
        (Outcome::Denied, _) if action.ends_with("Decrypt") => true,
        (_, Some("DisabledException" | "KMSInvalidStateException")) if uses_key => true,
        (_, Some("KMSInternalException")) => true,
        _ => false,
    }
}

/// Runs `work` on the blocking pool every `every` until shutdown, logging failures (a sealed
/// server simply has nothing to do yet).
async fn periodic<T: Send + 'static>(
    name: &'static str,
    every: Duration,
    metrics: Arc<metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
    work: impl Fn() -> Result<T, custody_kms::KmsError> + Send + Sync + 'static,
    report: impl Fn(T) + Send + 'static,
) {
    let work = Arc::new(work);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let w = work.clone();
        let result = match tokio::task::spawn_blocking(move || w()).await {
            Ok(Ok(v)) => {
                report(v);
                "ok"
            }
            Ok(Err(custody_kms::KmsError::Sealed)) => "sealed",
            Ok(Err(e)) => {
                tracing::error!(task = name, error = %e, "background task failed; will retry");
                "error"
            }
            Err(e) => {
                tracing::error!(task = name, error = %e, "background task panicked");
                "error"
            }
        };
        metrics.task_ran(name, result);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileTypeExt;

    use super::AtomicFile;

    /// A device, a pipe or a directory at the destination is refused and left as it is; a
    /// regular file is replaced whole.
    #[test]
    fn atomic_files_replace_regular_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let link = dir.path().join("link-to-pipe");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let to_stdout = dir.path().join("link-to-stdout");
        std::os::unix::fs::symlink("/dev/stdout", &to_stdout).unwrap();
        assert_eq!(super::output_target(&to_stdout), super::OutputTarget::Descriptor(1));
        assert_eq!(super::output_target("/proc/self/fd/2".as_ref()), super::OutputTarget::Descriptor(2));
        assert_eq!(super::output_target(&fifo), super::OutputTarget::Special);
        assert_eq!(super::output_target(&dir.path().join("absent")), super::OutputTarget::File);
        let paths = [fifo.as_path(), &link, &to_stdout, "/dev/stdout".as_ref(), dir.path(), "/dev/null".as_ref()];
        for special in paths {
            let e = AtomicFile::create(special, None).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{}", special.display());
            assert!(e.to_string().contains("is not a regular file"), "{e}");
        }
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
        let file = dir.path().join("file");
        std::fs::write(&file, b"old").unwrap();
        let mut staged = AtomicFile::create(&file, None).unwrap();
        staged.write_all(b"new").unwrap();
        staged.commit().unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(std::fs::symlink_metadata("/dev/stdout").unwrap().is_symlink(), "/dev/stdout was replaced");
        assert_eq!(super::output_target(&file), super::OutputTarget::File);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4, "no temporary file left");
    }
}
