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

/// A child process killed on drop (so a failing test leaves no server behind).
pub struct Running {
    pub child: Child,
    pub addr: String,
    pub stderr_lines: Vec<String>,
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

/// Runs `custody server` and waits for its "listening" line on stderr.
// The child is moved into `Running`, whose Drop kills and waits for it.
#[allow(clippy::zombie_processes)]
/// Starts `custody server` as `custody dev` configures it (separation of duties `warn`, new keys
/// usable by the tenant's key users); see [`all_roles`].
pub fn spawn_server(data: &Path) -> Running {
    let mut child = custody()
        .args(["server", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .env("CUSTODY_SEPARATION_OF_DUTIES", "warn")
        .env("CUSTODY_DEFAULT_KEY_POLICY", "tenant")
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
            std::thread::spawn(move || for _ in reader.lines() {});
            return Running { child, addr, stderr_lines: lines };
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
