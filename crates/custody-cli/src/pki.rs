//! `custody pki ...` and `custody agent`: the internal CA's certificates, their revocation,
//! renewal by their holders, and expiry you can see.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::access::parse_ttl;
use crate::commands::{connect, fmt_secs as when, output, profile, CliResult};
use crate::exit::{self, CliError};
use crate::{bootstrap, ConnArgs};

/// `custody pki ...`
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Issue a client certificate for a principal (tenant admin), or a server certificate
    /// (security officer). Writes the certificate, its key (0600), the CA and (for a principal) a
    /// profile into DIR.
    #[command(after_help = "\
Examples:
  custody pki issue --principal app --ttl 24h --out ./app
  custody pki issue --server --name kms2.internal --name 10.0.0.12 --out ./kms2-tls")]
    Issue {
        /// The principal a client certificate is for.
        #[arg(long, conflicts_with = "server", required_unless_present = "server")]
        principal: Option<String>,
        /// Issue a server certificate instead.
        #[arg(long, requires = "name")]
        server: bool,
        /// Host name or IP address of the server (repeatable).
        #[arg(long)]
        name: Vec<String>,
        /// Lifetime: 30m, 24h, 30d (default: 24h for clients, 30d for servers).
        #[arg(long)]
        ttl: Option<String>,
        /// Directory to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Certificates the CA issued: serial, kind, subject, expiry, status.
    #[command(after_help = "Examples:\n  custody pki list\n  custody pki list --json")]
    List,
    /// Revoke a certificate by serial, or every certificate of a principal. Enforced within
    /// seconds on every node, at the handshake and on connections already open.
    #[command(after_help = "\
Examples:
  custody pki revoke 5f0c2a...
  custody pki revoke --principal app")]
    Revoke {
        /// Serial number (hex, from `custody pki list`).
        #[arg(required_unless_present = "principal")]
        serial: Option<String>,
        /// Every certificate of this principal instead.
        #[arg(long, conflicts_with = "serial")]
        principal: Option<String>,
    },
    /// Renew your own client certificate with the current one (no administrator needed): the
    /// new certificate and key replace the profile's files atomically.
    #[command(after_help = "Example:\n  CUSTODY_PROFILE=./app/profile.toml custody pki renew")]
    Renew {
        /// Lifetime of the new certificate (default: that of the current one).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Roll the internal CA over to a new one, in three steps (security officer): `start`
    /// (the new CA is trusted, not issuing: now give clients the new ca.crt, e.g. with
    /// `custody pki renew` or the agent), `finish` (the new CA issues; servers switch their
    /// certificates at once; the old CA stays trusted), `retire` (the old CA is no longer
    /// trusted: renew every client certificate it issued before this).
    #[command(
        name = "rotate-ca",
        after_help = "\
Example, over a transition window:
  custody pki rotate-ca start     # then: every client runs `custody pki renew` (or its agent does)
  custody pki rotate-ca finish    # servers now present certificates from the new CA
  custody pki rotate-ca retire    # after every client certificate was renewed"
    )]
    RotateCa {
        /// start, finish or retire.
        #[arg(value_parser = ["start", "finish", "retire"])]
        step: String,
    },
    /// Every certificate custody knows (the server's, the CA, the client certificates you may
    /// list, your own) with the days left; exits 1 if any valid one expires within the window.
    #[command(after_help = "\
Examples:
  custody pki status
  custody pki status --warn 30d --json")]
    Status {
        /// Warning window.
        #[arg(long, default_value = "7d")]
        warn: String,
    },
}

/// `custody agent`
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  CUSTODY_PROFILE=/etc/app/custody/profile.toml custody agent
  custody agent --profile ./app/profile.toml --once   # from cron or a systemd timer")]
pub struct AgentArgs {
    /// Renew if due, then exit (instead of running until stopped).
    #[arg(long)]
    pub once: bool,
    /// Look at the certificate at least this often (it is renewed at two thirds of its life).
    #[arg(long, default_value = "60s")]
    pub check_every: String,
}

pub(crate) async fn pki(conn: &ConnArgs, cmd: PkiCommand, json: bool) -> CliResult<()> {
    match cmd {
        PkiCommand::Issue { principal, server, name, ttl, out } => {
            let mut c = connect(conn).await?;
            let ttl = ttl.as_deref().map(parse_ttl).transpose()?;
            let (r, written) = if server {
                let r = c.call("Custody.IssueServerCertificate", json!({ "Names": name, "TtlSeconds": ttl })).await?;
                let (crt, key, ca) = write_cert_files(&out, "server", &r)?;
                (r, json!({ "Certificate": crt, "PrivateKey": key, "CaCertificate": ca }))
            } else {
                // As `principal cert issue`: with a profile the principal can use at once.
                let p = principal.unwrap_or_default();
                let r = c.call("Custody.IssueCertificate", json!({ "Name": p, "TtlSeconds": ttl })).await?;
                let profile = crate::access::write_credentials(conn, &out, &p, &r)?;
                (r, json!({ "Profile": profile }))
            };
            let shown = json!({ "Serial": r["Serial"], "NotAfter": r["NotAfter"], "Files": written });
            output(json, &shown, || {
                println!("Certificate {} written to {}.", r["Serial"].as_str().unwrap_or(""), out.display());
            });
        }
        PkiCommand::List => {
            let mut c = connect(conn).await?;
            let r = c.call("Custody.ListCertificates", json!({})).await?;
            output(json, &r, || {
                let issuing = issuing_ca(&r);
                println!("{:<34} {:<7} {:<8} {:<21} SUBJECT", "SERIAL", "KIND", "STATUS", "NOT AFTER");
                for cert in r["Certificates"].as_array().into_iter().flatten() {
                    let old = from_another_ca(cert, issuing.as_deref());
                    println!(
                        "{:<34} {:<7} {:<8} {:<21} {}{}",
                        cert["Serial"].as_str().unwrap_or(""),
                        cert["Kind"].as_str().unwrap_or(""),
                        cert["Status"].as_str().unwrap_or(""),
                        when(cert["NotAfter"].as_i64().unwrap_or(0)),
                        cert["Subject"].as_str().unwrap_or(""),
                        if old { "  (from the previous CA: renew before `rotate-ca retire`)" } else { "" }
                    );
                }
            });
        }
        PkiCommand::Revoke { serial, principal } => {
            let mut c = connect(conn).await?;
            let body = match (serial, principal) {
                (Some(s), _) => json!({ "Serial": s }),
                (None, p) => json!({ "Principal": p }),
            };
            let r = c.call("Custody.RevokeCertificate", body).await?;
            output(json, &r, || {
                let revoked: Vec<&str> =
                    r["Revoked"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                if revoked.is_empty() {
                    println!("Nothing to revoke: already revoked.");
                } else {
                    println!("Revoked {} certificate(s): {}", revoked.len(), revoked.join(", "));
                    println!("Every node refuses them within seconds, on open connections too.");
                }
            });
        }
        PkiCommand::Renew { ttl } => {
            let ttl = ttl.as_deref().map(parse_ttl).transpose()?;
            let r = renew(conn, ttl).await?;
            output(json, &r, || {
                println!(
                    "Renewed: certificate {} valid until {} written to {}.",
                    r["Serial"].as_str().unwrap_or(""),
                    when(r["NotAfter"].as_i64().unwrap_or(0)),
                    r["CertificateFile"].as_str().unwrap_or("")
                );
            });
        }
        PkiCommand::Status { warn } => return status(conn, parse_ttl(&warn)? as i64, json).await,
        PkiCommand::RotateCa { step } => {
            let mut c = connect(conn).await?;
            let r = c.call("Custody.RotateCa", json!({ "Step": step })).await?;
            output(json, &r, || {
                for ca in r["CertificateAuthorities"].as_array().into_iter().flatten() {
                    println!("{:<34} {}", ca["Serial"].as_str().unwrap_or(""), ca["Subject"].as_str().unwrap_or(""));
                }
                match step.as_str() {
                    "start" => println!("\nNext: give every client the new trust bundle (custody pki renew, custody agent), then `custody pki rotate-ca finish`."),
                    "finish" => println!("\nThe new CA issues now. Renew every client certificate, then `custody pki rotate-ca retire`."),
                    _ => println!("\nThe previous CA is no longer trusted."),
                }
            });
        }
    }
    Ok(())
}

/// Renews the profile's client certificate and replaces its files. Returns what was written.
async fn renew(conn: &ConnArgs, ttl: Option<u64>) -> CliResult<Value> {
    let p = profile(conn)?;
    let (cert_file, key_file) = p.client_cert()?.ok_or_else(|| {
        CliError::new(
            exit::USAGE,
            "renewing needs the current client certificate: use a profile with cert_file and key_file (CUSTODY_PROFILE)",
        )
    })?;
    let mut c = connect(conn).await?;
    let r = c.call("Custody.RenewCertificate", json!({ "TtlSeconds": ttl })).await?;
    let io = |m: String| CliError::new(exit::FAILURE, m);
    // The key first: a workload that reloads between the two renames sees a certificate that does
    // not match its key, refuses it and keeps its current one until the next look.
    bootstrap::write_file(&key_file, r["PrivateKey"].as_str().unwrap_or("").as_bytes(), 0o600).map_err(io)?;
    bootstrap::write_file(&cert_file, r["Certificate"].as_str().unwrap_or("").as_bytes(), 0o644).map_err(io)?;
    // The CAs to trust now (two during a CA rollover).
    if let (Some(bundle), Ok(ca_file)) = (r["CaCertificate"].as_str().filter(|b| !b.is_empty()), p.ca_file()) {
        bootstrap::write_file(&ca_file, bundle.as_bytes(), 0o644).map_err(io)?;
    }
    Ok(json!({
        "Serial": r["Serial"],
        "NotAfter": r["NotAfter"],
        "CertificateFile": cert_file,
        "KeyFile": key_file,
    }))
}

/// Writes an issued certificate (`STEM.crt`), its key (`STEM.key`, 0600, written first) and the
/// CA bundle (`ca.crt`) into `dir`; returns their paths.
pub(crate) fn write_cert_files(dir: &Path, stem: &str, r: &Value) -> CliResult<(PathBuf, PathBuf, PathBuf)> {
    let io = |m: String| CliError::new(exit::FAILURE, m);
    std::fs::create_dir_all(dir).map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
    let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
    let (crt, key, ca) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")), dir.join("ca.crt"));
    bootstrap::write_file(&key, s("PrivateKey").as_bytes(), 0o600).map_err(io)?;
    bootstrap::write_file(&crt, s("Certificate").as_bytes(), 0o644).map_err(io)?;
    bootstrap::write_file(&ca, s("CaCertificate").as_bytes(), 0o644).map_err(io)?;
    Ok((crt, key, ca))
}

/// Serial of the CA that issues now, from a ListCertificates answer.
fn issuing_ca(list: &Value) -> Option<String> {
    list["Certificates"].as_array()?.iter().find_map(|c| {
        (c["Kind"] == "ca" && c["Subject"].as_str().is_some_and(|s| s.contains("issuing")))
            .then(|| c["Serial"].as_str().unwrap_or("").to_string())
    })
}

/// A valid certificate issued by a CA other than the issuing one (during a rollover).
fn from_another_ca(cert: &Value, issuing: Option<&str>) -> bool {
    cert["Kind"] != "ca"
        && cert["Status"] == "valid"
        && matches!((cert["Issuer"].as_str(), issuing), (Some(i), Some(now)) if i != now)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

async fn status(conn: &ConnArgs, warn_secs: i64, json: bool) -> CliResult<()> {
    let now = now_secs();
    let mut rows: Vec<Value> = Vec::new();
    let mut push = |kind: &str, serial: &str, subject: &str, not_after: i64, status: &str| {
        let left = not_after - now;
        rows.push(json!({
            "Kind": kind,
            "Serial": serial,
            "Subject": subject,
            "NotAfter": not_after,
            "DaysLeft": (left as f64 / 86_400.0 * 10.0).floor() / 10.0,
            "Status": status,
            "InsideWarningWindow": status == "valid" && left <= warn_secs,
        }));
    };
    let mut c = connect(conn).await?;
    // The server's certificate, as it presented it on this very connection.
    if let Some(der) = c.server_certificate() {
        let s = custody_server::tls::describe_der(der).map_err(|e| CliError::new(exit::FAILURE, e.0))?;
        push("server (served)", &s.serial, &s.names.join(","), s.not_after, "valid");
    }
    // Your own certificate.
    let p = profile(conn)?;
    if let Some((cert_file, _)) = p.client_cert()? {
        let s = custody_server::tls::describe_pem_file(&cert_file).map_err(|e| CliError::new(exit::FAILURE, e.0))?;
        push("client (yours)", &s.serial, s.identity.as_deref().unwrap_or(""), s.not_after, "valid");
    }
    // What the CA issued, if you may list it; otherwise the CA from your profile.
    match c.call("Custody.ListCertificates", json!({})).await {
        Ok(r) => {
            for cert in r["Certificates"].as_array().into_iter().flatten() {
                let kind = cert["Kind"].as_str().unwrap_or("");
                let status = cert["Status"].as_str().unwrap_or("");
                // Expired and revoked certificates are history, not a warning.
                if kind != "ca" && status != "valid" {
                    continue;
                }
                push(
                    kind,
                    cert["Serial"].as_str().unwrap_or(""),
                    cert["Subject"].as_str().unwrap_or(""),
                    cert["NotAfter"].as_i64().unwrap_or(0),
                    status,
                );
            }
        }
        Err(custody_client::ClientError::Api { status: 400, .. }) => {
            let ca =
                custody_server::tls::describe_pem_file(&p.ca_file()?).map_err(|e| CliError::new(exit::FAILURE, e.0))?;
            push("ca", &ca.serial, &ca.common_name, ca.not_after, "valid");
        }
        Err(e) => return Err(e.into()),
    }
    let inside: Vec<&Value> = rows.iter().filter(|r| r["InsideWarningWindow"] == true).collect();
    let report =
        json!({ "Certificates": rows, "WarningWindowDays": warn_secs as f64 / 86_400.0, "Expiring": inside.len() });
    output(json, &report, || {
        println!("{:<16} {:<34} {:>9}  {:<21} SUBJECT", "KIND", "SERIAL", "DAYS LEFT", "NOT AFTER");
        for r in &rows {
            let mark = if r["InsideWarningWindow"] == true { "  <-- expires within the warning window" } else { "" };
            println!(
                "{:<16} {:<34} {:>9}  {:<21} {}{mark}",
                r["Kind"].as_str().unwrap_or(""),
                r["Serial"].as_str().unwrap_or(""),
                r["DaysLeft"],
                when(r["NotAfter"].as_i64().unwrap_or(0)),
                r["Subject"].as_str().unwrap_or("")
            );
        }
        if !inside.is_empty() {
            println!("\n{} certificate(s) expire within the warning window: renew them (custody pki renew, custody agent; the server renews its own).", inside.len());
        }
    });
    if inside.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(exit::FAILURE, format!("{} certificate(s) expire within the warning window", inside.len())))
    }
}

pub(crate) async fn agent(conn: &ConnArgs, args: AgentArgs, json: bool) -> CliResult<()> {
    let check_every = Duration::from_secs(parse_ttl(&args.check_every)?.max(1));
    let p = profile(conn)?;
    let (cert_file, _) = p.client_cert()?.ok_or_else(|| {
        CliError::new(exit::USAGE, "the agent renews a client certificate: use a profile with cert_file and key_file")
    })?;
    loop {
        let current =
            custody_server::tls::describe_pem_file(&cert_file).map_err(|e| CliError::new(exit::FAILURE, e.0))?;
        let due = current.renew_at();
        if now_secs() >= due {
            match renew(conn, None).await {
                Ok(r) => {
                    output(json, &r, || {
                        eprintln!(
                            "custody agent: renewed {} -> {} (valid until {})",
                            current.serial,
                            r["Serial"].as_str().unwrap_or(""),
                            when(r["NotAfter"].as_i64().unwrap_or(0))
                        )
                    });
                }
                // Keep trying while the current certificate is still valid; give up once it is not.
                Err(e) if now_secs() < current.not_after && !args.once => {
                    eprintln!("custody agent: renewal failed, retrying: {}", e.message);
                }
                Err(e) => return Err(e),
            }
            if args.once {
                return Ok(());
            }
            tokio::time::sleep(check_every.min(Duration::from_secs(5))).await;
            continue;
        }
        if args.once {
            output(json, &json!({ "Serial": current.serial, "RenewAt": due, "Renewed": false }), || {
                eprintln!("custody agent: {} is not due for renewal until {}", current.serial, when(due))
            });
            return Ok(());
        }
        let wait = Duration::from_secs((due - now_secs()).max(1) as u64).min(check_every);
        tokio::time::sleep(wait).await;
    }
}
