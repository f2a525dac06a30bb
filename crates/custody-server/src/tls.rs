//! TLS 1.3 only, with optional client certificates verified against the internal CA; the served
//! certificate can be swapped while the server runs, and revoked client certificates are refused.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use x509_parser::extensions::GeneralName;

/// A TLS setup problem, with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// Answers whether a client certificate's serial (lowercase hex) is revoked.
pub type RevocationCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The certificate the server presents, replaceable while it runs: new handshakes get the new
/// one, connections already open keep theirs.
#[derive(Debug)]
pub struct ServedCert {
    current: RwLock<Arc<Loaded>>,
}

/// A certificate chain with its key, ready to serve, and what custody needs to know about it.
#[derive(Debug)]
pub struct Loaded {
    certified: Arc<CertifiedKey>,
    /// The leaf certificate.
    pub leaf: CertSummary,
}

impl ServedCert {
    /// Starts with `loaded`.
    pub fn new(loaded: Loaded) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(Arc::new(loaded)) })
    }

    /// What is served now.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves `loaded` from the next handshake on.
    pub fn replace(&self, loaded: Loaded) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
    }
}

impl ResolvesServerCert for ServedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().certified.clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parses and checks a certificate chain and its key (PEM): they must belong together.
pub fn load_pem(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<Loaded, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("bad PEM in {what}: {e}")))?;
    let leaf = certs.first().ok_or_else(|| TlsError(format!("no certificate in {what}")))?.clone();
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError(format!("cannot read the key of {what}: {e}")))?;
    let certified = CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| TlsError(format!("the certificate and key of {what} do not work together: {e}")))?;
    let summary = describe_der(leaf.as_ref()).map_err(|e| TlsError(format!("bad certificate in {what}: {}", e.0)))?;
    Ok(Loaded { certified: Arc::new(certified), leaf: summary })
}

/// What custody reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Serial number (lowercase hex).
    pub serial: String,
    /// `notBefore`, seconds since the epoch.
    pub not_before: i64,
    /// `notAfter`, seconds since the epoch.
    pub not_after: i64,
    /// DNS names and IP addresses.
    pub names: Vec<String>,
    /// The first URI SAN (a principal's identity).
    pub identity: Option<String>,
    /// Subject common name.
    pub common_name: String,
    /// Issuer common name.
    pub issuer: String,
}

impl CertSummary {
    /// When custody renews it: at two thirds of its life, which starts at `notBefore` plus the
    /// clock-skew backdating custody applies (seconds since the epoch).
    pub fn renew_at(&self) -> i64 {
        let start = (self.not_before + custody_crypto::pki::CLOCK_SKEW.whole_seconds()).min(self.not_after);
        start + (self.not_after - start) * 2 / 3
    }
}

/// Reads a DER certificate.
pub fn describe_der(der: &[u8]) -> Result<CertSummary, TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError(format!("not a certificate: {e}")))?;
    let mut names = Vec::new();
    let mut identity = None;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push((*d).to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("4 bytes")).to_string()),
                    16 => {
                        names.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("16 bytes")).to_string())
                    }
                    _ => {}
                },
                GeneralName::URI(u) if identity.is_none() => identity = Some((*u).to_string()),
                _ => {}
            }
        }
    }
    let cn = |name: &x509_parser::x509::X509Name<'_>| {
        name.iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default().to_string()
    };
    let (common_name, issuer) = (cn(parsed.subject()), cn(parsed.issuer()));
    Ok(CertSummary {
        serial: custody_crypto::pki::serial_hex(parsed.raw_serial()),
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        names,
        identity,
        common_name,
        issuer,
    })
}

/// Reads the first certificate of PEM text.
pub fn describe_pem(pem: &[u8]) -> Result<CertSummary, TlsError> {
    let first = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| TlsError("no certificate".into()))?
        .map_err(|e| TlsError(format!("bad PEM: {e}")))?;
    describe_der(first.as_ref())
}

/// Reads the first certificate of a PEM file.
pub fn describe_pem_file(path: &Path) -> Result<CertSummary, TlsError> {
    let first = load_certs(path)?.into_iter().next().expect("load_certs refuses empty files");
    describe_der(first.as_ref()).map_err(|e| TlsError(format!("{}: {}", path.display(), e.0)))
}

/// Reads a certificate chain and key from files (see [`load_pem`]).
pub fn load_files(cert_file: &Path, key_file: &Path) -> Result<Loaded, TlsError> {
    let cert = std::fs::read(cert_file).map_err(|e| TlsError(format!("cannot read {}: {e}", cert_file.display())))?;
    let key = zeroize::Zeroizing::new(
        std::fs::read(key_file)
            .map_err(|e| TlsError(format!("cannot read the server key {}: {e}", key_file.display())))?,
    );
    load_pem(&cert, &key, &cert_file.display().to_string())
}

/// The server's rustls configuration: TLS 1.3 only (TLS 1.2 is not even compiled in), key exchange
/// preferring the hybrid post-quantum X25519MLKEM768 and falling back to X25519, client
/// certificates optional at the handshake but verified against `client_ca` when presented and
/// refused when revoked; the served certificate is whatever `served` holds at each handshake.
pub fn server_config(served: Arc<ServedCert>, trust: Arc<ClientTrust>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(trust)
        .with_cert_resolver(served);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Which client certificates the server accepts: those of the CAs in `tls.client_ca_file` and
/// in the store's trust bundle (both CAs during a rollover), unless revoked. The CA set can
/// change while the server runs ([`ClientTrust::update`]). Every refusal is logged with its
/// reason and the certificate's serial and identity, because the client only sees a TLS alert.
pub struct ClientTrust {
    client_ca_file: std::path::PathBuf,
    inner: RwLock<(String, Arc<dyn ClientCertVerifier>)>,
    revoked: RevocationCheck,
}

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTrust").field("client_ca_file", &self.client_ca_file).finish_non_exhaustive()
    }
}

impl ClientTrust {
    /// Trusts the CAs in `client_ca_file`.
    pub fn new(client_ca_file: &Path, revoked: RevocationCheck) -> Result<Arc<Self>, TlsError> {
        let inner = Self::verifier(client_ca_file, "")?;
        Ok(Arc::new(Self {
            client_ca_file: client_ca_file.to_path_buf(),
            inner: RwLock::new((String::new(), inner)),
            revoked,
        }))
    }

    fn verifier(client_ca_file: &Path, bundle: &str) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in load_certs(client_ca_file)? {
            roots.add(ca).map_err(|e| TlsError(format!("bad CA certificate in {}: {e}", client_ca_file.display())))?;
        }
        for ca in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            let ca = ca.map_err(|e| TlsError(format!("bad CA certificate in the store: {e}")))?;
            roots.add(ca).map_err(|e| TlsError(format!("bad CA certificate in the store: {e}")))?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError(format!("cannot build the client verifier: {e}")))
    }

    /// Trusts the CA file (read again) and `bundle` from the next handshake on, if `bundle`
    /// changed. Returns whether it did.
    pub fn update(&self, bundle: &str) -> Result<bool, TlsError> {
        if self.inner.read().unwrap_or_else(|p| p.into_inner()).0 == bundle {
            return Ok(false);
        }
        let verifier = Self::verifier(&self.client_ca_file, bundle)?;
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = (bundle.to_string(), verifier);
        Ok(true)
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }
}

impl ClientCertVerifier for ClientTrust {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: they would have to outlive a CA change, and custody's clients know which
        // certificate to present.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let serial = serial_of(end_entity).unwrap_or_default();
        let identity = identity_of(end_entity).unwrap_or_else(|| "-".into());
        if let Err(e) = self.current().verify_client_cert(end_entity, intermediates, now) {
            tracing::warn!(%serial, %identity, error = %e, "client certificate refused");
            return Err(e);
        }
        if (self.revoked)(&serial) {
            tracing::warn!(%serial, %identity, "client certificate refused: revoked");
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("bad PEM in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

/// The first URI SAN of a (verified) client certificate: the caller's identity.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => Some((*uri).to_string()),
        _ => None,
    })
}

/// A certificate's serial number (lowercase hex, as custody records it).
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(custody_crypto::pki::serial_hex(parsed.raw_serial()))
}
