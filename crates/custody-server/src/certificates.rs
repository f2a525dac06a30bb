//! The server's certificates over time: revocations loaded every second, its own certificate
//! renewed at two thirds of its life (or operator-provided files reloaded when they change), and
//! a daily warning inside the expiry window.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use custody_kms::{AuditEvent, Kms, Outcome};
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::tls::{self, ServedCert};

/// How often revocations are reloaded from the store: a revocation on any node is enforced on
/// every node within about this long, on connections already open too.
const REVOCATION_REFRESH: Duration = Duration::from_secs(1);
/// How often operator-provided certificate files are checked for changes.
const FILE_WATCH: Duration = Duration::from_secs(2);

/// Starts the certificate tasks; they end at shutdown.
pub(crate) fn spawn(
    config: &ServerConfig,
    kms: Arc<Kms>,
    served: Arc<ServedCert>,
    trust: Arc<tls::ClientTrust>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let k = kms.clone();
    // The CA file the server writes the store's trust bundle into, when it is custody's own.
    let own_ca_file = config.tls.client_ca_file.is_none().then(|| config.client_ca_file());
    tokio::spawn(crate::periodic(
        "revocation and trust refresh",
        REVOCATION_REFRESH,
        metrics,
        shutdown.clone(),
        move || match refresh_trust(&k, &trust, own_ca_file.as_deref()) {
            // While sealed nothing but status and unseal is answered; all of it loads at unseal.
            Err(custody_kms::KmsError::Sealed) => Ok(()),
            other => other,
        },
        |_| {},
    ));
    let lifetime = Duration::from_secs(config.danger_server_cert_lifetime_seconds);
    if lifetime < Duration::from_secs(30 * 24 * 3600) {
        tracing::warn!(seconds = lifetime.as_secs(), "danger_server_cert_lifetime_seconds is set: the server renews its certificate every few seconds (tests only)");
    }
    let watcher = Watcher {
        kms,
        served,
        cert_file: config.cert_file(),
        key_file: config.key_file(),
        managed: config.tls.cert_file.is_none() && config.tls.key_file.is_none(),
        lifetime,
        warn_within: Duration::from_secs(config.tls.expiry_warn_days.saturating_mul(24 * 3600)),
        warn_every: Duration::from_millis(config.danger_day_length_ms),
        stamp: file_stamp(&config.cert_file(), &config.key_file()),
        unloadable: None,
        warned: None,
    };
    // Check often enough to renew a short-lived certificate on time; once a minute at most.
    let tick = (lifetime / 30).clamp(Duration::from_millis(500), Duration::from_secs(60));
    let tick = if watcher.managed { tick } else { tick.min(FILE_WATCH) };
    tokio::spawn(watcher.run(tick, shutdown));
}

/// Revoked serials and trusted CAs, from the store: every node follows a revocation or a CA
/// rollover step within about a second.
fn refresh_trust(kms: &Kms, trust: &tls::ClientTrust, own_ca_file: Option<&Path>) -> Result<(), custody_kms::KmsError> {
    kms.refresh_revocations()?;
    let bundle = kms.trust_bundle()?;
    if let Some(file) = own_ca_file {
        // Kept equal to the bundle, so a restart trusts the same CAs and a retired CA stays out.
        if std::fs::read_to_string(file).ok().as_deref() != Some(bundle.as_str()) {
            if let Err(e) = crate::write_file(file, bundle.as_bytes(), 0o644) {
                tracing::error!(file = %file.display(), error = %e, "cannot write the CA bundle");
            }
        }
    }
    match trust.update(&bundle) {
        Ok(true) => tracing::info!(cas = bundle.matches("BEGIN CERTIFICATE").count(), "trusted CAs changed"),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "cannot load the trusted CAs; keeping the current ones"),
    }
    Ok(())
}

struct Watcher {
    kms: Arc<Kms>,
    served: Arc<ServedCert>,
    cert_file: PathBuf,
    key_file: PathBuf,
    /// The server issues its own certificate (the default files); otherwise the operator
    /// provides the files and the server only reloads them.
    managed: bool,
    lifetime: Duration,
    warn_within: Duration,
    warn_every: Duration,
    stamp: Option<(SystemTime, SystemTime)>,
    /// Files seen changed and not loadable once (see `reload_if_changed`).
    unloadable: Option<Option<(SystemTime, SystemTime)>>,
    warned: Option<std::time::Instant>,
}

impl Watcher {
    async fn run(mut self, tick: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = shutdown.changed() => return,
            }
            // Renewal signs with the CA and writes files: off the async workers.
            self = match tokio::task::spawn_blocking(move || {
                self.step();
                self
            })
            .await
            {
                Ok(w) => w,
                Err(_) => return,
            };
        }
    }

    fn step(&mut self) {
        if self.managed {
            self.renew_if_due();
        } else {
            self.reload_if_changed();
        }
        self.warn_if_expiring();
    }

    /// At two thirds of the served certificate's life (custody backdates `notBefore` by the
    /// clock-skew allowance, which is not part of its life), or at once if it outlives the
    /// configured lifetime (the lifetime was shortened), issue a new one, write it where the
    /// server reads it at start, and serve it from the next handshake on.
    fn renew_if_due(&mut self) {
        let current = self.served.current();
        let now = now_secs();
        let outlives = current.leaf.not_after > now + self.lifetime.as_secs() as i64 + 60;
        // After a CA rollover the certificate comes from the new CA at once.
        let issuer_changed = match self.kms.ca_certificate() {
            Ok(pem) => tls::describe_pem(pem.as_bytes()).is_ok_and(|ca| ca.common_name != current.leaf.issuer),
            Err(_) => false,
        };
        if now < current.leaf.renew_at() && !outlives && !issuer_changed {
            return;
        }
        let names =
            if current.leaf.names.is_empty() { vec!["localhost".to_string()] } else { current.leaf.names.clone() };
        let (_, cert) = match self.kms.renew_server_certificate(&names, self.lifetime) {
            Ok(c) => c,
            Err(custody_kms::KmsError::Sealed) => return,
            Err(e) => {
                tracing::error!(error = %e, "the server certificate is due for renewal and could not be renewed; retrying");
                return;
            }
        };
        let loaded = match tls::load_pem(
            cert.cert_pem.as_bytes(),
            cert.key_pem.expose_secret(),
            "the renewed certificate",
        ) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "the renewed server certificate does not load; keeping the current one");
                return;
            }
        };
        if let Err(e) = crate::write_file(&self.key_file, cert.key_pem.expose_secret(), 0o600)
            .and_then(|()| crate::write_file(&self.cert_file, cert.cert_pem.as_bytes(), 0o644))
        {
            tracing::error!(error = %e, "the renewed server certificate could not be written; serving it from memory");
        }
        let old = current.leaf.serial.clone();
        self.served.replace(loaded);
        self.stamp = file_stamp(&self.cert_file, &self.key_file);
        tracing::info!(old = %old, new = %cert.serial, not_after = %cert.not_after, "serving the renewed server certificate");
    }

    /// Operator-provided files: reload when they change; keep the old certificate when the new
    /// files do not load, and say so loudly.
    fn reload_if_changed(&mut self) {
        let stamp = file_stamp(&self.cert_file, &self.key_file);
        if stamp == self.stamp {
            return;
        }
        match tls::load_files(&self.cert_file, &self.key_file) {
            Ok(loaded) => {
                tracing::info!(serial = %loaded.leaf.serial, not_after = loaded.leaf.not_after, "reloaded the server certificate files");
                self.served.replace(loaded);
                self.stamp = stamp;
                self.unloadable = None;
            }
            // The certificate and the key are two files: one may be new and the other not yet.
            // Look again at the next tick before calling the change bad.
            Err(e) if self.unloadable != Some(stamp) => {
                tracing::debug!(error = %e, "changed server certificate files do not load yet; looking again");
                self.unloadable = Some(stamp);
            }
            Err(e) => {
                tracing::error!(error = %e, "the changed server certificate files do not load: keeping the current certificate");
                self.alert("Custody.ReloadServerCertificate", format!("rejected new certificate files: {e}"));
                self.stamp = stamp;
                self.unloadable = None;
            }
        }
    }

    /// Inside the warning window of the served certificate or the CA: a warning and an audit
    /// alert, once a day.
    fn warn_if_expiring(&mut self) {
        if self.warned.is_some_and(|t| t.elapsed() < self.warn_every) {
            return;
        }
        let horizon = now_secs() + self.warn_within.as_secs() as i64;
        let mut expiring = Vec::new();
        let served = self.served.current();
        if served.leaf.not_after <= horizon {
            expiring.push(format!("server certificate {} expires at {}", served.leaf.serial, served.leaf.not_after));
        }
        if let Ok(certs) = self.kms.ca_not_after() {
            if certs <= horizon {
                expiring.push(format!("CA certificate expires at {certs}"));
            }
        }
        if expiring.is_empty() {
            return;
        }
        self.warned = Some(std::time::Instant::now());
        let what = expiring.join("; ");
        tracing::warn!(certificates = %what, "certificates inside the expiry warning window");
        self.alert("Custody.CertificateExpiryWarning", what);
    }

    fn alert(&self, action: &str, detail: String) {
        let event = AuditEvent {
            time: custody_kms::model::now_ms(),
            request_id: String::new(),
            node: String::new(),
            source: "custody server".into(),
            tls_identity: None,
            principal: Some("custody:server".into()),
            access_key_id: None,
            action: action.into(),
            key_id: None,
            key_version: None,
            encryption_context: None,
            source_key_id: None,
            source_key_version: None,
            source_encryption_context: None,
            outcome: Outcome::Failed,
            error_code: None,
            detail: Some(detail),
            duration_ms: 0,
            alert: true,
        };
        if let Err(e) = self.kms.record_audit(event, None) {
            tracing::debug!(error = %e, "certificate alert not recorded in the audit trail (sealed?)");
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn file_stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}
