//! TLS 1.3 only, with optional client certificates verified against the internal CA.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::extensions::GeneralName;

/// A TLS setup problem, with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// The server's rustls configuration: TLS 1.3 only (TLS 1.2 is not even compiled in), key exchange
/// preferring the hybrid post-quantum X25519MLKEM768 and falling back to X25519, client
/// certificates optional at the handshake but verified against `client_ca` when presented.
pub fn server_config(cert_file: &Path, key_file: &Path, client_ca_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = load_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TlsError(format!("cannot read the server key {}: {e}", key_file.display())))?;
    let mut roots = RootCertStore::empty();
    for ca in load_certs(client_ca_file)? {
        roots.add(ca).map_err(|e| TlsError(format!("bad CA certificate in {}: {e}", client_ca_file.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError(format!("cannot build the client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("the server certificate and key do not work together: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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
