//! Shared test helpers: data directories, in-process servers, and the `custody` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use custody_cli::bootstrap::{self, Bootstrap, Layout, SealChoice};
use custody_client::{Client, Profile};
use custody_kms::PrincipalName;
use custody_server::{Server, ServerConfig};

pub fn custody() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_custody"));
    // Tests must not pick up a developer's own profile or environment.
    for v in ["CUSTODY_PROFILE", "CUSTODY_ENDPOINT", "CUSTODY_CA_FILE", "CUSTODY_CERT_FILE", "CUSTODY_KEY_FILE"] {
        c.env_remove(v);
    }
    c.env("HOME", "/nonexistent").env("RUST_LOG", "warn");
    c
}

/// A data directory initialized with a key-file seal.
pub fn keyfile_dir() -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (layout, _) = bootstrap::init(Bootstrap {
        database: None,
        data_dir: data.clone(),
        admin_roles: custody_kms::Role::ALL.to_vec(),
        seal: SealChoice::KeyFile(dir.path().join("root.key")),
        tenant: None,
        admin: PrincipalName::parse("admin").unwrap(),
        server_names: vec!["localhost".into(), "127.0.0.1".into()],
        endpoint: "https://127.0.0.1:1".into(),
    })
    .unwrap();
    (dir, layout)
}

pub fn config(dir: &Path, layout: &Layout) -> ServerConfig {
    ServerConfig {
        data_dir: layout.data_dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        seal: Some(format!("keyfile:{}", dir.join("root.key").display())),
        // As `custody dev` runs; the access-control tests start production-like servers.
        separation_of_duties: "warn".into(),
        default_key_policy: "tenant".into(),
        ..ServerConfig::default()
    }
}

/// Starts an in-process server and points the admin profile at it.
pub async fn start(dir: &Path, layout: &Layout, tweak: impl FnOnce(&mut ServerConfig)) -> (Server, Profile) {
    let mut c = config(dir, layout);
    tweak(&mut c);
    let server = Server::start(c).await.unwrap();
    let endpoint = format!("https://127.0.0.1:{}", server.local_addr().port());
    let path = bootstrap::write_profile(layout, "admin", &endpoint).unwrap();
    (server, Profile::load(&path).unwrap())
}

pub async fn admin_client(profile: &Profile) -> Client {
    Client::connect(profile).await.unwrap()
}

/// Creates a key as `c` (with no parameters) and returns the new key's `field` ("KeyId" or "Arn").
pub async fn create_key(c: &mut Client, field: &str) -> String {
    let made = c.call("TrentService.CreateKey", serde_json::json!({})).await.unwrap();
    made["KeyMetadata"][field]
        .as_str()
        .unwrap_or_else(|| panic!("CreateKey answered without {field}: {made}"))
        .to_string()
}

/// A child process killed on drop (so a failing test leaves no server behind).
pub struct Running {
    pub child: Child,
    pub addr: String,
    pub stderr_lines: Vec<String>,
    /// Everything the server logged after its "listening" line.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not stop on SIGTERM within 5 s");
    }
}

/// Starts `custody server` as `custody dev` configures it (separation of duties `warn`, new keys
/// usable by the tenant's key users; see [`all_roles`]) and waits for its "listening" line.
pub fn spawn_server(data: &Path) -> Running {
    spawn_server_with(data, &[])
}

/// [`spawn_server`] with more environment variables (`CUSTODY_DATABASE_URL`, ...).
// The child is moved into `Running`, whose Drop kills and waits for it.
#[allow(clippy::zombie_processes)]
pub fn spawn_server_with(data: &Path, env: &[(&str, &str)]) -> Running {
    let mut child = custody()
        .args(["server", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .env("CUSTODY_SEPARATION_OF_DUTIES", "warn")
        .env("CUSTODY_DEFAULT_KEY_POLICY", "tenant")
        // As `custody dev` does: memory is locked when the machine allows it (CAP_IPC_LOCK or
        // an unlimited RLIMIT_MEMLOCK), and a machine that does not still runs the suite;
        // tests/memory.rs checks the production setting and the refusal.
        .env("CUSTODY_DANGER_ALLOW_SWAP", "true")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut reader = BufReader::new(stderr);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server exited before listening: {lines:?}");
        }
        if let Some(rest) = line.trim().strip_prefix("custody listening on https://") {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            // Keep draining stderr so the child never blocks on a full pipe.
            let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in reader.lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            return Running { child, addr, stderr_lines: lines, log };
        }
        lines.push(line);
    }
}

/// Gives the administrator of `profile` every role, as `custody dev` does, so a test can manage
/// and use keys with one identity (needs a server with separation of duties relaxed to `warn`).
pub fn all_roles(profile: &Path) {
    let mut args = vec!["principal", "roles", "admin"];
    for r in custody_kms::Role::ALL {
        args.extend(["--role", r.as_str()]);
    }
    let out = custody().arg("--profile").arg(profile).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

// ----- SigV4 by hand (AWS's algorithm), for requests signed with an access key -----

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::HeaderMap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use std::sync::Arc;

pub struct Signer {
    pub id: String,
    pub secret: String,
    pub region: String,
}

/// TLS 1.3 trusting `ca`, without a client certificate (as the AWS SDKs connect, and as anyone
/// on the network can).
pub fn anonymous_connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Sends `TrentService.<action>` signed with SigV4 at time `when`, with `tweak` applied to the
/// headers after signing. Returns (status, body).
pub async fn send(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    signer: &Signer,
    action: &str,
    body: Value,
    when: time::OffsetDateTime,
    tweak: impl FnOnce(&mut HeaderMap),
) -> (u16, Value) {
    let body = serde_json::to_vec(&body).unwrap();
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let amz_date = when.format(&format).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("host", format!("127.0.0.1:{}", addr.port()).parse().unwrap());
    headers.insert("content-type", "application/x-amz-json-1.1".parse().unwrap());
    headers.insert("x-amz-date", amz_date.parse().unwrap());
    // `Encrypt` is `TrentService.Encrypt`; a custody action is given in full (`Custody.WhoCan`).
    let target = if action.contains('.') { action.to_string() } else { format!("TrentService.{action}") };
    headers.insert("x-amz-target", target.parse().unwrap());
    let signed: Vec<String> = ["content-type", "host", "x-amz-date", "x-amz-target"].map(String::from).to_vec();
    let req =
        custody_server::sigv4::RequestParts { method: "POST", path: "/", query: "", headers: &headers, body: &body };
    let canonical = custody_server::sigv4::canonical_request(&req, &signed).unwrap();
    let date = &amz_date[..8];
    let scope = format!("{date}/{}/kms/aws4_request", signer.region);
    let sts =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", custody_crypto::sigv4::sha256_hex(canonical.as_bytes()));
    let key = custody_crypto::sigv4::signing_key(
        &custody_crypto::SecretBytes::copy_from(signer.secret.as_bytes()),
        date,
        &signer.region,
        "kms",
    );
    let sig = hex::encode(custody_crypto::sigv4::sign(&key, sts.as_bytes()));
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={}, Signature={sig}",
        signer.id,
        signed.join(";")
    );
    headers.insert("authorization", auth.parse().unwrap());
    tweak(&mut headers);

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = anonymous_connector(ca).connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut request = hyper::Request::post("/").body(Full::new(Bytes::from(body))).unwrap();
    *request.headers_mut() = headers;
    let resp = sender.send_request(request).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

pub fn code(v: &Value) -> &str {
    v["__type"].as_str().unwrap_or("")
}

/// A PostgreSQL store for one test: `CUSTODY_TEST_DATABASE_URL`, else the machine's server at
/// 127.0.0.1:5432 (database `test`), in a fresh schema. Drop it with
/// `PostgresBackend::connect(&opts)?.drop_schema()`.
pub fn test_database() -> custody_store::PostgresOptions {
    let url =
        std::env::var("CUSTODY_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    custody_store::PostgresOptions {
        url,
        schema: format!("custody_e2e_{nanos:x}_{}", std::process::id()),
        allow_plaintext: false,
        ca_file: None,
    }
}

/// `custody init` into `dir/data` with a key file at `dir/root.key`: the first administrator
/// `admin` with `roles`, the store in `database` (PostgreSQL) or `dir/data/custody.db`. Returns
/// the layout and the first tenant's id.
pub fn init_store(
    dir: &Path,
    roles: Vec<custody_kms::Role>,
    database: Option<custody_store::PostgresOptions>,
) -> (Layout, String) {
    let (layout, out) = bootstrap::init(Bootstrap {
        database,
        data_dir: dir.join("data"),
        admin_roles: roles,
        seal: SealChoice::KeyFile(dir.join("root.key")),
        tenant: None,
        admin: PrincipalName::parse("admin").unwrap(),
        server_names: vec!["localhost".into(), "127.0.0.1".into()],
        endpoint: "https://localhost:8443".into(),
    })
    .unwrap_or_else(|e| {
        panic!("init failed: {e}\n(for PostgreSQL: set CUSTODY_TEST_DATABASE_URL to a reachable database)")
    });
    (layout, out.tenant.to_string())
}

/// `custody init` into `dir/data` with 3-of-5 Shamir shares (the store in `database`, or
/// SQLite): the layout and the shares.
pub fn init_shamir(
    dir: &Path,
    database: Option<custody_store::PostgresOptions>,
) -> (Layout, Vec<custody_crypto::shamir::UnsealShare>) {
    let (layout, out) = bootstrap::init(Bootstrap {
        database,
        data_dir: dir.join("data"),
        admin_roles: custody_kms::Role::ALL.to_vec(),
        seal: SealChoice::Shamir { threshold: 3, shares: 5 },
        tenant: None,
        admin: PrincipalName::parse("admin").unwrap(),
        server_names: vec!["localhost".into(), "127.0.0.1".into()],
        endpoint: "https://127.0.0.1:1".into(),
    })
    .unwrap();
    (layout, out.shares)
}

/// Submits `shares` (texts) to the server of `profile`; the last status, or the first refusal.
pub async fn unseal(profile: &Profile, shares: &[String]) -> Result<serde_json::Value, custody_client::ClientError> {
    let mut c = Client::connect(profile).await.unwrap();
    let mut last = serde_json::Value::Null;
    for s in shares {
        last = c.call("Custody.Unseal", serde_json::json!({ "Share": s })).await?;
    }
    Ok(last)
}

/// `custody root rotate --json --shares-dir DIR` with the profile at `profile`, off the async
/// workers (the CLI waits for the end of the rotation); its output, after checking it succeeded.
pub async fn rotate_root(profile: &Path, shares_dir: &Path) -> serde_json::Value {
    let (profile, shares_dir) = (profile.to_path_buf(), shares_dir.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        custody()
            .arg("--profile")
            .arg(&profile)
            .args(["root", "rotate", "--json", "--shares-dir"])
            .arg(&shares_dir)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
