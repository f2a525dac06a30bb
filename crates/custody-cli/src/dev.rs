//! `custody dev`: one command to a working local KMS.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use custody_kms::PrincipalName;
use serde_json::json;
use zeroize::Zeroizing;

use crate::bootstrap::{self, Bootstrap, Layout, SealChoice};
use crate::exit::{self, CliError};

/// `custody dev`
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Data directory (created on first use).
    #[arg(long, value_name = "DIR", default_value = ".custody-dev")]
    pub data: PathBuf,
    /// Listen address; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
}

const ADMIN: &str = "admin";

pub async fn run(a: DevArgs, json: bool) -> Result<(), CliError> {
    let fail = |m: String| CliError::new(exit::FAILURE, m);
    let layout = Layout { data_dir: a.data.clone() };
    let key_file = a.data.join("root.key");
    let first_run = !layout.is_initialized();
    if first_run {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        let ip = a.listen.ip();
        if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
            names.push(ip.to_string());
        }
        bootstrap::init(Bootstrap {
            database: None,
            data_dir: a.data.clone(),
            admin_roles: custody_kms::Role::ALL.to_vec(),
            seal: SealChoice::KeyFile(key_file.clone()),
            tenant: None,
            admin: PrincipalName::parse(ADMIN).expect("valid name"),
            server_names: names,
            endpoint: "https://127.0.0.1:8443".into(),
        })
        .map_err(fail)?;
    }
    let mut config = custody_server::ServerConfig::load(None).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    config.data_dir = a.data.clone();
    config.listen = a.listen;
    config.seal = Some(format!("keyfile:{}", key_file.display()));
    // Development only: one principal holds every role and new keys are usable by it.
    config.separation_of_duties = "warn".into();
    config.default_key_policy = "tenant".into();
    // Core dumps are off and memory is locked where the limits allow; a laptop's small
    // locked-memory limit does not stop development.
    config.danger_allow_swap = true;
    custody_server::process::harden(config.danger_allow_swap).map_err(fail)?;
    let shutdown = crate::commands::Shutdown::install()?;
    let server = custody_server::Server::start(config).await.map_err(|e| fail(e.to_string()))?;
    let addr = server.local_addr();
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let endpoint = format!("https://{host}:{}", addr.port());
    let profile = bootstrap::write_profile(&layout, ADMIN, &endpoint).map_err(fail)?;
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let (profile, ca) = (abs(profile), abs(layout.ca_cert()));
    let (key_id, secret) = aws_credentials(&a.data, &profile).await?;
    let env_file = a.data.join("env");
    let region = "us-east-1";
    let metrics = server.metrics_addr().map(|a| format!("http://{a}/metrics"));
    let mut env = format!(
        "export CUSTODY_ENDPOINT={endpoint}\nexport CUSTODY_PROFILE={profile}\nexport CUSTODY_CA_FILE={ca}\n\
         export AWS_ENDPOINT_URL_KMS={endpoint}\nexport AWS_CA_BUNDLE={ca}\nexport AWS_ACCESS_KEY_ID={key_id}\n\
         export AWS_SECRET_ACCESS_KEY={secret}\nexport AWS_DEFAULT_REGION={region}\n",
        profile = profile.display(),
        ca = ca.display(),
        secret = secret.as_str(),
    );
    if let Some(url) = &metrics {
        env.push_str(&format!("export CUSTODY_METRICS_URL={url}\n"));
    }
    // It holds a secret access key: private to the user.
    bootstrap::write_file(&env_file, env.as_bytes(), 0o600).map_err(fail)?;
    if json {
        crate::commands::print_json(&json!({
            "Endpoint": endpoint, "Profile": profile, "CaFile": ca, "EnvFile": abs(env_file), "FirstRun": first_run,
            "AwsAccessKeyId": key_id, "SeparationOfDuties": "warn", "Metrics": metrics,
        }));
    } else {
        println!("custody dev is running (TLS 1.3, unsealed with the DEVELOPMENT key file {}).", key_file.display());
        if first_run {
            println!("Initialized a new store in {}.", a.data.display());
        }
        println!(
            "Development mode only: separation of duties is relaxed to `warn` (one principal, `admin`, holds every \
             role; policies that give it both key administration and Decrypt are allowed and flagged as audit alerts), \
             and new keys are usable by the tenant's key users. docs/ACCESS.md describes production."
        );
        if let Some(url) = &metrics {
            println!("Metrics (Prometheus text, this machine only): {url}");
        }
        println!("\nIn another shell:\n\n  source {}\n\nor set:\n\n{}", env_file.display(), indent(&env));
        println!(
            "Try: custody key create --description demo\nStop with Ctrl-C; the keys are kept in {}.",
            a.data.display()
        );
    }
    shutdown.wait().await;
    server.shutdown().await;
    Ok(())
}

/// The development administrator's access key: created through the API on first use, kept in
/// DIR/aws-credentials (AWS's credentials-file format, mode 0600), re-created if it was deleted.
async fn aws_credentials(
    data: &std::path::Path,
    profile: &std::path::Path,
) -> Result<(String, Zeroizing<String>), CliError> {
    let fail = |m: String| CliError::new(exit::FAILURE, m);
    let path = data.join("aws-credentials");
    let mut client = custody_client::Client::connect(&custody_client::Profile::load(profile)?).await?;
    if let Ok(text) = std::fs::read_to_string(&path).map(Zeroizing::new) {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()))
        };
        if let (Some(id), Some(secret)) = (field("aws_access_key_id"), field("aws_secret_access_key")) {
            let keys = client.call("Custody.ListAccessKeys", json!({})).await?;
            let active = keys["AccessKeys"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["AccessKeyId"] == id.as_str() && k["Status"] == "Active");
            if active {
                return Ok((id, Zeroizing::new(secret)));
            }
        }
    }
    let created = client.call("Custody.CreateAccessKey", json!({})).await?;
    let id = created["AccessKey"]["AccessKeyId"].as_str().unwrap_or_default().to_string();
    let secret = Zeroizing::new(created["AccessKey"]["SecretAccessKey"].as_str().unwrap_or_default().to_string());
    let file =
        Zeroizing::new(format!("[default]\naws_access_key_id = {id}\naws_secret_access_key = {}\n", secret.as_str()));
    bootstrap::write_file(&path, file.as_bytes(), 0o600).map_err(fail)?;
    Ok((id, secret))
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}
