//! Certificate issuance for the internal CA (ECDSA P-256, via rcgen).
//!
//! Pure: the caller supplies "now" and the lifetimes, and stores the results.

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::random;
use crate::secret::SecretBytes;

/// Backdating of `notBefore`, so peers with slightly slow clocks accept new certificates.
/// Renewal schedules count a certificate's life from `notBefore` plus this.
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

/// A certificate and its private key.
pub struct IssuedCert {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM (PKCS#8) private key.
    pub key_pem: SecretBytes,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Certificate issuance failed (bad name, bad stored CA key).
#[derive(Debug, thiserror::Error)]
#[error("certificate issuance failed: {0}")]
pub struct PkiError(String);

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        Self(e.to_string())
    }
}

/// Creates a self-signed CA.
pub fn new_ca(common_name: &str, now: OffsetDateTime, lifetime: Duration) -> Result<IssuedCert, PkiError> {
    let mut params = base_params(now, lifetime);
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok(finish(cert.pem(), &key, &params))
}

/// Issues a TLS server certificate for `names` (DNS names or IP addresses).
pub fn issue_server(
    ca: &IssuedCert,
    names: &[String],
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<IssuedCert, PkiError> {
    let mut params = base_params(now, lifetime);
    params.distinguished_name = name(names.first().map(String::as_str).unwrap_or("custody"));
    for n in names {
        params.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.as_str().try_into()?),
        });
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign(ca, params)
}

/// Issues a TLS client certificate whose identity is the URI SAN `uri`
/// (e.g. `spiffe://custody/111122223333/admin`).
pub fn issue_client(
    ca: &IssuedCert,
    uri: &str,
    common_name: &str,
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<IssuedCert, PkiError> {
    let mut params = base_params(now, lifetime);
    params.distinguished_name = name(common_name);
    params.subject_alt_names.push(SanType::URI(uri.try_into()?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    sign(ca, params)
}

fn sign(ca: &IssuedCert, params: CertificateParams) -> Result<IssuedCert, PkiError> {
    let ca_pem = std::str::from_utf8(ca.key_pem.expose_secret()).map_err(|_| PkiError("CA key is not PEM".into()))?;
    let ca_key = KeyPair::from_pem(ca_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(finish(cert.pem(), &key, &params))
}

fn base_params(now: OffsetDateTime, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
    // 16 random bytes with the top bit clear: positive, unique, unpredictable (RFC 5280 §4.1.2.2).
    let mut serial: [u8; 16] = random::array();
    // Positive (DER) and without a leading zero byte, so every serial is 16 bytes, 32 hex digits
    // (a zero first byte, 1 time in 128, made a shorter serial), with 126 random bits.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "custody");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn finish(cert_pem: String, key: &KeyPair, params: &CertificateParams) -> IssuedCert {
    let serial = params.serial_number.as_ref().map(|s| serial_hex(&s.to_bytes())).unwrap_or_default();
    IssuedCert {
        cert_pem,
        key_pem: SecretBytes::new(key.serialize_pem().into_bytes()),
        serial,
        not_after: params.not_after,
    }
}

/// A serial number as custody writes it everywhere: lowercase hex of its value, without leading
/// zero bytes (so the form in the store and the one read back from a certificate agree, however
/// the DER integer was padded).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_a_chain() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca("custody test CA", now, Duration::days(3650)).unwrap();
        let server = issue_server(&ca, &["localhost".into(), "127.0.0.1".into()], now, Duration::days(30)).unwrap();
        let client = issue_client(&ca, "spiffe://custody/111122223333/admin", "admin", now, Duration::days(1)).unwrap();
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(server.serial, client.serial);
        assert_eq!(client.serial.len(), 32);
        assert!(std::str::from_utf8(client.key_pem.expose_secret()).unwrap().contains("PRIVATE KEY"));
        assert!(!format!("{client:?}").contains("PRIVATE"));
    }

    #[test]
    fn bad_names_are_errors_not_panics() {
        let now = OffsetDateTime::now_utc();
        let ca = new_ca("ca", now, Duration::days(1)).unwrap();
        assert!(issue_client(&ca, "spiffe://custody/é", "x", now, Duration::days(1)).is_err());
    }
}
