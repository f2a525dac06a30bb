//! `custody dev`: one command to a working local KMS.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use custody_kms::PrincipalName;
use serde_json::json;

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
            data_dir: a.data.clone(),
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
    config.seal = format!("keyfile:{}", key_file.display());
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
    let env_file = a.data.join("env");
    let env = format!(
        "export CUSTODY_ENDPOINT={endpoint}\nexport CUSTODY_PROFILE={}\nexport CUSTODY_CA_FILE={}\n",
        profile.display(),
        ca.display()
    );
    bootstrap::write_file(&env_file, env.as_bytes(), 0o644).map_err(fail)?;
    if json {
        crate::commands::print_json(&json!({
            "Endpoint": endpoint, "Profile": profile, "CaFile": ca, "EnvFile": abs(env_file), "FirstRun": first_run,
        }));
    } else {
        println!("custody dev is running (TLS 1.3, unsealed with the DEVELOPMENT key file {}).", key_file.display());
        if first_run {
            println!("Initialized a new store in {}.", a.data.display());
        }
        println!("\nIn another shell:\n\n  source {}\n\nor set:\n\n{}", env_file.display(), indent(&env));
        println!(
            "Try: custody key create --description demo\nStop with Ctrl-C; the keys are kept in {}.",
            a.data.display()
        );
    }
    crate::commands::wait_for_shutdown().await;
    server.shutdown().await;
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}
