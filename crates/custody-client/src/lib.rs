//! custody's Rust client: the KMS JSON protocol over TLS 1.3 with a client certificate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), custody_client::ClientError> {
//! let profile = custody_client::Profile::load(std::path::Path::new(".custody-dev/profile.toml"))?;
//! let mut client = custody_client::Client::connect(&profile).await?;
//! let key = client.call("TrentService.CreateKey", serde_json::json!({})).await?;
//! println!("{}", key["KeyMetadata"]["Arn"]);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod profile;

use std::sync::Arc;

use bytes::Bytes;
use custody_crypto::secret_json::SecretJson;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub mod keyring;
pub mod metrics;

pub use keyring::{CacheLimits, CachingKeyring, Discovery, KmsKeyring};
pub use profile::{Endpoint, Profile};

/// What can go wrong talking to custody.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an AWS-style error.
    #[error("{code}: {message}")]
    Api {
        /// HTTP status
        status: u16,
        /// AWS error name
        code: String,
        /// message
        message: String,
    },
    /// Could not reach the server or the connection broke.
    #[error("cannot reach custody at {endpoint}: {reason}")]
    Connect {
        /// endpoint
        endpoint: String,
        /// cause
        reason: String,
    },
    /// Local configuration (profile, certificate files) is unusable.
    #[error("{0}")]
    Config(String),
    /// The server sent something that is not the protocol.
    #[error("unexpected response from custody: {0}")]
    Protocol(String),
}

/// A connection to custody. Requests reuse one kept-alive TLS connection, reconnecting if the
/// server closed it.
pub struct Client {
    endpoint: Endpoint,
    profile: Profile,
    connector: TlsConnector,
    /// When the client certificate and key files were last changed, as loaded into `connector`.
    loaded: Option<(std::time::SystemTime, std::time::SystemTime)>,
    sender: Option<SendRequest<Full<Bytes>>>,
    kx_group: Option<String>,
    server_cert: Option<Vec<u8>>,
    /// Why the current connection ended, once it has (filled by its task).
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The request id the server gave the last answer (`x-amzn-requestid`).
    last_request_id: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("endpoint", &self.endpoint.to_string()).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects with the profile's endpoint, CA and (optional) client certificate.
    pub async fn connect(profile: &Profile) -> Result<Self, ClientError> {
        let endpoint = profile.endpoint()?;
        let loaded = cert_stamp(profile);
        let connector = TlsConnector::from(tls_config(profile)?);
        let mut client = Self {
            endpoint,
            profile: profile.clone(),
            connector,
            loaded,
            sender: None,
            kx_group: None,
            server_cert: None,
            failure: Default::default(),
            last_request_id: None,
        };
        client.reconnect().await?;
        Ok(client)
    }

    /// The request id of the last answer (`x-amzn-requestid`): what its audit record carries.
    pub fn last_request_id(&self) -> Option<&str> {
        self.last_request_id.as_deref()
    }

    /// The certificate the server presented on the current connection (DER).
    pub fn server_certificate(&self) -> Option<&[u8]> {
        self.server_cert.as_deref()
    }

    /// The key exchange group negotiated on the current connection (`X25519MLKEM768` when both
    /// sides support the hybrid post-quantum exchange).
    pub fn key_exchange_group(&self) -> Option<&str> {
        self.kx_group.as_deref()
    }

    async fn reconnect(&mut self) -> Result<(), ClientError> {
        // A renewed client certificate (written by `custody agent` or `custody pki renew`) is
        // picked up by the next connection, without restarting the workload.
        // Files caught between the key and the certificate being replaced do not load together:
        // keep the previous certificate and look again at the next connection.
        let stamp = cert_stamp(&self.profile);
        if stamp != self.loaded {
            if let Ok(config) = tls_config(&self.profile) {
                self.connector = TlsConnector::from(config);
                self.loaded = stamp;
            }
        }
        let connect_err = |reason: String| ClientError::Connect { endpoint: self.endpoint.to_string(), reason };
        let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name =
            ServerName::try_from(self.endpoint.host.clone()).map_err(|e| connect_err(format!("bad host name: {e}")))?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| connect_err(format!("TLS handshake failed: {}", chain(&e))))?;
        self.kx_group = tls.get_ref().1.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()));
        self.server_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| connect_err(chain(&e)))?;
        let failure = Arc::new(std::sync::Mutex::new(None));
        let record = failure.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                *record.lock().unwrap_or_else(|p| p.into_inner()) = Some(chain(&e));
            }
        });
        self.sender = Some(sender);
        self.failure = failure;
        Ok(())
    }

    /// `GET /healthz`: answered without authentication, sealed or not.
    pub async fn health(&mut self) -> Result<Value, ClientError> {
        let req = Request::get("/healthz")
            .header("host", self.endpoint.authority())
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send(req).await
    }

    /// Calls `target` (`TrentService.Encrypt`, `Custody.GetStatus`, ...) with a JSON body. The
    /// body may carry a plaintext or a data key: its strings are wiped, and it is sent from memory
    /// wiped once sent ([`SecretJson`]).
    pub async fn call(&mut self, target: &str, body: Value) -> Result<Value, ClientError> {
        self.send_body(target, SecretJson::new(body).into_bytes()).await
    }

    /// Like [`Client::call`], with the request body as raw bytes (sent as-is).
    pub async fn call_bytes(&mut self, target: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        self.send_body(target, Bytes::from(body)).await
    }

    async fn send_body(&mut self, target: &str, body: Bytes) -> Result<Value, ClientError> {
        let req = Request::post("/")
            .header("host", self.endpoint.authority())
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", target)
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send(req).await
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Value, ClientError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.reconnect().await?;
        }
        let endpoint = self.endpoint.to_string();
        // The server may have closed the kept-alive connection since the last answer (it does
        // after `Connection: close`); nothing was sent on it yet, so connect again and send once.
        if self.sender.as_mut().expect("connected above").ready().await.is_err() {
            self.reconnect().await?;
        }
        // Why the connection ended, if it did (a TLS 1.3 server refuses a client certificate with
        // an alert the client reads only after its handshake "succeeded").
        let sender = self.sender.as_mut().expect("connected above");
        let sent = match sender.ready().await {
            Ok(()) => sender.send_request(req).await,
            Err(e) => Err(e),
        };
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                // The connection's task records its error as it ends, just after the sender sees
                // the connection closed: give it a moment.
                let mut reason = None;
                for _ in 0..50 {
                    reason = self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if reason.is_some() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                return Err(ClientError::Connect { endpoint, reason: reason.unwrap_or_else(|| chain(&e)) });
            }
        };
        let status = resp.status().as_u16();
        self.last_request_id = resp.headers().get("x-amzn-requestid").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = resp.into_body().collect().await.map_err(|e| ClientError::Protocol(e.to_string()))?.to_bytes();
        let value: Value = serde_json::from_slice(&body)
            .map_err(|_| ClientError::Protocol(format!("HTTP {status} with a body that is not JSON")))?;
        if status == 200 {
            return Ok(value);
        }
        Err(ClientError::Api {
            status,
            code: value["__type"].as_str().unwrap_or("UnknownError").to_string(),
            message: value["message"].as_str().unwrap_or("").to_string(),
        })
    }
}

/// An error and its causes, `outer: inner: innermost` (hyper's own message alone is often just
/// "connection error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

impl Profile {
    /// The TLS 1.3 client configuration this profile gives: its CA as the only root, its client
    /// certificate if it has one, HTTP/1.1 by ALPN (what [`Client`] connects with).
    pub fn tls_config(&self) -> Result<Arc<ClientConfig>, ClientError> {
        tls_config(self)
    }
}

fn tls_config(profile: &Profile) -> Result<Arc<ClientConfig>, ClientError> {
    let cfg_err = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        ClientError::Config(format!("cannot use {what} {}: {e}", path.display()))
    };
    let mut roots = RootCertStore::empty();
    let ca_file = profile.ca_file()?;
    for cert in CertificateDer::pem_file_iter(&ca_file).map_err(|e| cfg_err("the CA file", &ca_file, &e))? {
        let cert = cert.map_err(|e| cfg_err("the CA file", &ca_file, &e))?;
        roots.add(cert).map_err(|e| cfg_err("the CA file", &ca_file, &e))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match profile.client_cert()? {
        Some((cert_file, key_file)) => {
            let certs = CertificateDer::pem_file_iter(&cert_file)
                .map_err(|e| cfg_err("the certificate", &cert_file, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| cfg_err("the certificate", &cert_file, &e))?;
            let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| cfg_err("the private key", &key_file, &e))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| cfg_err("the certificate", &cert_file, &e))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// When the profile's client certificate and key files were last modified (None without them).
fn cert_stamp(profile: &Profile) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (cert, key) = profile.client_cert().ok()??;
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(&cert)?, modified(&key)?))
}
