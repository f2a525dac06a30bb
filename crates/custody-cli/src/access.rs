//! `custody tenant`, `custody principal` and `custody access`: who exists, what they hold, and
//! who can do what (docs/ACCESS.md).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::{json, Value};

use crate::commands::{connect, context, output, parse_pair, profile, simple, CliResult};
use crate::exit::{self, CliError};
use crate::ConnArgs;

/// `custody tenant ...` (security officer).
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and its first tenant admin; writes the admin's certificate, key and
    /// profile into --out.
    #[command(after_help = "Example:\n  custody tenant create --name payments --admin alice --out ./alice")]
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// Name of the tenant's first tenant admin.
        #[arg(long)]
        admin: String,
        /// Account id (12 digits; random if absent).
        #[arg(long)]
        id: Option<String>,
        /// Directory for the admin's credentials and profile.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// List tenants.
    #[command(after_help = "Example:\n  custody tenant list --json")]
    List,
}

/// `custody principal ...` (tenant admin of your tenant).
#[derive(Debug, Subcommand)]
pub enum PrincipalCommand {
    /// Create a principal with roles.
    #[command(
        after_help = "Examples:\n  custody principal create app --role key-user\n  custody principal create ops --role key-admin --role auditor"
    )]
    Create {
        /// Name.
        name: String,
        /// Role (repeatable): tenant-admin, key-admin, key-user, auditor, security-officer.
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
    },
    /// List the principals of your tenant.
    #[command(after_help = "Example:\n  custody principal list")]
    List,
    /// Show one principal.
    #[command(after_help = "Example:\n  custody principal describe app")]
    Describe {
        /// Name.
        name: String,
    },
    /// Disable a principal: its next request is refused, on open connections too.
    #[command(after_help = "Example:\n  custody principal disable app")]
    Disable {
        /// Name.
        name: String,
    },
    /// Enable a disabled principal.
    #[command(after_help = "Example:\n  custody principal enable app")]
    Enable {
        /// Name.
        name: String,
    },
    /// Replace a principal's roles.
    #[command(after_help = "Example:\n  custody principal roles app --role key-user --role auditor")]
    Roles {
        /// Name.
        name: String,
        /// Role (repeatable).
        #[arg(long = "role", value_name = "ROLE", required = true)]
        roles: Vec<String>,
    },
    /// Delete a principal and its access keys.
    #[command(after_help = "Example:\n  custody principal delete app")]
    Delete {
        /// Name.
        name: String,
    },
    /// Client certificates.
    #[command(subcommand)]
    Cert(CertCommand),
}

/// `custody principal cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a client certificate; writes NAME.crt, NAME.key (0600), ca.crt and profile.toml.
    #[command(
        after_help = "Example:\n  custody principal cert issue app --ttl 24h --out ./app\n  CUSTODY_PROFILE=./app/profile.toml custody status"
    )]
    Issue {
        /// Principal name.
        name: String,
        /// Lifetime: 30m, 24h, 7d (default 24h, at most 90d).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Directory to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// `custody access ...` (auditor or key admin).
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Every principal that can take ACTION on KEY, with the statement or grant that allows it.
    #[command(
        name = "who-can",
        after_help = "Example:\n  custody access who-can alias/payments --action Decrypt -c app=billing"
    )]
    WhoCan {
        /// Key id, ARN or alias.
        key: String,
        /// Action (Decrypt, kms:Encrypt, ...).
        #[arg(long, default_value = "Decrypt")]
        action: String,
        /// Encryption context KEY=VALUE to evaluate conditions with (repeatable).
        #[arg(short = 'c', long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
    },
    /// Whether PRINCIPAL may take ACTION on KEY, and why.
    #[command(after_help = "Example:\n  custody access explain app Decrypt alias/payments -c app=billing")]
    Explain {
        /// Principal name (your tenant) or ARN.
        principal: String,
        /// Action.
        action: String,
        /// Key id, ARN or alias.
        key: String,
        /// Encryption context KEY=VALUE (repeatable).
        #[arg(short = 'c', long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
    },
}

/// Parses 30s, 30m, 24h, 7d.
pub fn parse_ttl(s: &str) -> CliResult<u64> {
    let bad = || CliError::new(exit::USAGE, format!("{s:?} is not a duration: use 30m, 24h or 7d"));
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    Ok(n * mult)
}

/// Writes a certificate, its key, the CA and a profile into `dir`.
pub(crate) fn write_credentials(conn: &ConnArgs, dir: &Path, name: &str, cert: &Value) -> CliResult<PathBuf> {
    let io = |m: String| CliError::new(exit::FAILURE, m);
    let (crt, key, ca) = crate::pki::write_cert_files(dir, name, cert)?;
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let endpoint = profile(conn).ok().and_then(|p| p.endpoint);
    let p = custody_client::Profile {
        endpoint,
        ca_file: Some(abs(ca)),
        cert_file: Some(abs(crt)),
        key_file: Some(abs(key)),
    };
    let path = dir.join("profile.toml");
    p.save(&path).map_err(|e| io(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

pub(crate) async fn tenant(conn: &ConnArgs, cmd: TenantCommand, json: bool) -> CliResult<()> {
    let mut c = connect(conn).await?;
    match cmd {
        TenantCommand::Create { name, admin, id, out } => {
            let r = c.call("Custody.CreateTenant", json!({ "Name": name, "AdminName": admin, "TenantId": id })).await?;
            let profile = write_credentials(conn, &out, &admin, &r["AdminCertificate"])?;
            let mut shown = r.clone();
            shown["AdminCertificate"] = json!({ "Serial": r["AdminCertificate"]["Serial"], "NotAfter": r["AdminCertificate"]["NotAfter"], "Profile": profile });
            output(json, &shown, || {
                println!("Tenant {} ({name}) created.", r["Tenant"]["TenantId"].as_str().unwrap_or(""));
                println!("Its tenant admin {admin}: CUSTODY_PROFILE={} custody principal list", profile.display());
            });
        }
        TenantCommand::List => {
            let r = c.call("Custody.ListTenants", json!({})).await?;
            output(json, &r, || {
                for t in r["Tenants"].as_array().into_iter().flatten() {
                    println!("{}  {}", t["TenantId"].as_str().unwrap_or(""), t["Name"].as_str().unwrap_or(""));
                }
            });
        }
    }
    Ok(())
}

fn print_principal(p: &Value) {
    let roles: Vec<&str> = p["Roles"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    println!(
        "{:<24} {:<9} {}",
        p["Name"].as_str().unwrap_or(""),
        if p["Enabled"] == true { "enabled" } else { "DISABLED" },
        roles.join(",")
    );
}

pub(crate) async fn principal(conn: &ConnArgs, cmd: PrincipalCommand, json: bool) -> CliResult<()> {
    let mut c = connect(conn).await?;
    match cmd {
        PrincipalCommand::Create { name, roles } => {
            let r = c.call("Custody.CreatePrincipal", json!({ "Name": name, "Roles": roles })).await?;
            output(json, &r, || {
                print_principal(&r["Principal"]);
                println!("\nGive it a credential: custody principal cert issue {name} --out ./{name}");
            });
        }
        PrincipalCommand::List => {
            let r = c.call("Custody.ListPrincipals", json!({})).await?;
            output(json, &r, || r["Principals"].as_array().into_iter().flatten().for_each(print_principal));
        }
        PrincipalCommand::Describe { name } => {
            let r = c.call("Custody.DescribePrincipal", json!({ "Name": name })).await?;
            output(json, &r, || {
                let p = &r["Principal"];
                for k in ["Arn", "Identity", "Tenant"] {
                    println!("{k:<9} {}", p[k].as_str().unwrap_or(""));
                }
                print_principal(p);
            });
        }
        PrincipalCommand::Disable { name } => {
            let body = json!({ "Name": name, "Enabled": false });
            simple(&mut c, json, "Custody.UpdatePrincipal", body, &format!("Disabled {name}.")).await?
        }
        PrincipalCommand::Enable { name } => {
            let body = json!({ "Name": name, "Enabled": true });
            simple(&mut c, json, "Custody.UpdatePrincipal", body, &format!("Enabled {name}.")).await?
        }
        PrincipalCommand::Roles { name, roles } => {
            let body = json!({ "Name": name, "Roles": roles });
            simple(&mut c, json, "Custody.UpdatePrincipal", body, &format!("Roles of {name} set.")).await?
        }
        PrincipalCommand::Delete { name } => {
            simple(&mut c, json, "Custody.DeletePrincipal", json!({ "Name": name }), &format!("Deleted {name}."))
                .await?
        }
        PrincipalCommand::Cert(CertCommand::Issue { name, ttl, out }) => {
            let ttl = parse_ttl(&ttl)?;
            let r = c.call("Custody.IssueCertificate", json!({ "Name": name, "TtlSeconds": ttl })).await?;
            let profile = write_credentials(conn, &out, &name, &r)?;
            let shown = json!({ "Serial": r["Serial"], "NotAfter": r["NotAfter"], "Profile": profile });
            output(json, &shown, || {
                println!("Certificate {} for {name} written to {}.", r["Serial"].as_str().unwrap_or(""), out.display());
                println!("Use it: CUSTODY_PROFILE={} custody status", profile.display());
            });
        }
    }
    Ok(())
}

pub(crate) async fn access(conn: &ConnArgs, cmd: AccessCommand, json: bool) -> CliResult<()> {
    let mut c = connect(conn).await?;
    match cmd {
        AccessCommand::WhoCan { key, action, context: ctx } => {
            let mut body = json!({ "KeyId": key, "Action": action });
            if !ctx.is_empty() {
                body["EncryptionContext"] = json!(context(&ctx));
            }
            let r = c.call("Custody.WhoCan", body).await?;
            output(json, &r, || {
                for e in r["Principals"].as_array().into_iter().flatten() {
                    let via = match (e["Statement"].as_str(), e["GrantId"].as_str()) {
                        (Some(s), _) => format!("statement {s:?}"),
                        (_, Some(g)) => format!("grant {g}"),
                        _ => String::new(),
                    };
                    let note = e["Note"].as_str().map(|n| format!("  ({n})")).unwrap_or_default();
                    println!("{:<52} {via}{note}", e["Principal"].as_str().unwrap_or(""));
                }
            });
        }
        AccessCommand::Explain { principal, action, key, context: ctx } => {
            let mut body = json!({ "Principal": principal, "Action": action, "KeyId": key });
            if !ctx.is_empty() {
                body["EncryptionContext"] = json!(context(&ctx));
            }
            let r = c.call("Custody.ExplainAccess", body).await?;
            output(json, &r, || {
                let verdict = if r["Allowed"] == true { "ALLOWED" } else { "DENIED" };
                println!("{verdict}: {}", r["Reason"].as_str().unwrap_or(""));
            });
        }
    }
    Ok(())
}
