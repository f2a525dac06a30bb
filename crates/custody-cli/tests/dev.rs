//! `custody dev`: one command to a working KMS, and a restart keeps the keys.

mod common;

use std::io::Read;
use std::process::Stdio;

use common::custody;

struct Dev {
    child: std::process::Child,
    info: serde_json::Value,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// The child is moved into `Dev`, whose Drop kills and waits for it.
fn start_dev(dir: &std::path::Path, data: &std::path::Path) -> Dev {
    start_dev_with(dir, data, &[])
}

#[allow(clippy::zombie_processes)]
fn start_dev_with(dir: &std::path::Path, data: &std::path::Path, env: &[(&str, &str)]) -> Dev {
    let mut child = custody()
        .current_dir(dir)
        .envs(env.iter().copied())
        .args(["--json", "dev", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    // The first complete JSON object on stdout describes the running server.
    loop {
        if stdout.read(&mut byte).unwrap() == 0 {
            panic!("custody dev exited: {}", String::from_utf8_lossy(&buf));
        }
        buf.push(byte[0]);
        if byte[0] == b'}' {
            if let Ok(info) = serde_json::from_slice::<serde_json::Value>(&buf) {
                std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
                return Dev { child, info };
            }
        }
    }
}

fn stop(mut dev: Dev) {
    let pid = dev.child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = dev.child.wait().unwrap();
    assert!(status.success(), "custody dev exits cleanly on SIGTERM: {status:?}");
}

#[test]
fn dev_starts_writes_the_environment_and_keeps_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("devdata");
    let dev = start_dev(dir.path(), &data);
    assert_eq!(dev.info["FirstRun"], true);
    assert_eq!(dev.info["SeparationOfDuties"], "warn", "dev says separation of duties is relaxed");
    assert!(dev.info["Metrics"].is_null(), "no metrics listener unless asked for");
    let endpoint = dev.info["Endpoint"].as_str().unwrap().to_string();
    assert!(!endpoint.ends_with(":0"), "the real port is reported: {endpoint}");
    let env = std::fs::read_to_string(data.join("env")).unwrap();
    assert!(env.contains(&format!("export CUSTODY_ENDPOINT={endpoint}")), "{env}");
    assert!(env.contains("export CUSTODY_PROFILE=") && env.contains("export CUSTODY_CA_FILE="), "{env}");

    // Exactly what a user does after `source DIR/env`.
    let profile = dev.info["Profile"].as_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = custody().env("CUSTODY_PROFILE", &profile).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let created: serde_json::Value =
        serde_json::from_str(&run(&["--json", "key", "create", "--description", "dev"])).unwrap();
    let key_id = created["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    stop(dev);

    let dev = start_dev(dir.path(), &data);
    assert_eq!(dev.info["FirstRun"], false);
    let listed = run(&["key", "list"]);
    assert!(listed.contains(&key_id), "keys survive a restart: {listed}");
    stop(dev);
}

#[test]
fn dev_serves_metrics_when_asked_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("devdata");
    let dev = start_dev_with(dir.path(), &data, &[("CUSTODY_METRICS_LISTEN", "127.0.0.1:0")]);
    let url = dev.info["Metrics"].as_str().expect("the metrics URL is printed").to_string();
    let addr = url.strip_prefix("http://").and_then(|u| u.strip_suffix("/metrics")).unwrap().to_string();
    assert!(!addr.ends_with(":0"), "the real port is reported: {url}");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::Write;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.lines().any(|l| l == "custody_sealed 0"), "{text}");
    stop(dev);
}

/// `custody top` reads the metrics listener that `custody dev` reports (and writes to its env
/// file): the interval's requests by action, errors among them, the audit's commits, seal state,
/// keys and certificates; an unreachable or malformed URL is a clear error.
#[test]
fn top_shows_the_interval_s_requests() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("devdata");
    let dev = start_dev_with(dir.path(), &data, &[("CUSTODY_METRICS_LISTEN", "127.0.0.1:0")]);
    let url = dev.info["Metrics"].as_str().unwrap().to_string();
    let env = std::fs::read_to_string(data.join("env")).unwrap();
    assert!(env.contains(&format!("export CUSTODY_METRICS_URL={url}\n")), "{env}");
    let profile = dev.info["Profile"].as_str().unwrap().to_string();
    let cli = |args: &[&str]| custody().env("CUSTODY_PROFILE", &profile).args(args).output().unwrap();
    assert!(cli(&["key", "create", "--alias", "alias/top"]).status.success());
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "x").unwrap();
    let plain = plain.to_str().unwrap();

    // One view over 8 s; the requests below are made well inside it.
    let top = custody()
        .env("CUSTODY_METRICS_URL", &url)
        .args(["--json", "top", "--once", "--interval", "8"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    for _ in 0..4 {
        assert!(cli(&["encrypt-blob", "-k", "alias/top", plain]).status.success());
    }
    assert!(!cli(&["encrypt-blob", "-k", "alias/missing", plain]).status.success());
    let out = top.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let secs = v["interval_seconds"].as_f64().unwrap();
    assert!((7.5..12.0).contains(&secs), "{v}");
    let encrypt = v["actions"].as_array().unwrap().iter().find(|a| a["action"] == "TrentService.Encrypt").unwrap();
    let counted = |field: &str| (encrypt[field].as_f64().unwrap() * secs).round();
    assert_eq!(counted("requests_per_second"), 5.0, "{v}");
    assert_eq!(counted("errors_per_second"), 1.0, "{v}");
    assert_eq!(encrypt["total"], 5);
    assert!(encrypt["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(v["audit"]["commits_per_second"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["audit"]["failing"], false);
    assert_eq!(v["sealed"], false);
    // Counted by the scheduler's passes: the new key may not be in yet, the states are.
    assert!(v["keys"]["Enabled"].is_u64() && v["keys"]["PendingDeletion"].is_u64(), "{v}");
    assert!(v["certificate_expiry_seconds"]["server"].as_f64().unwrap() > 29.0 * 86_400.0);

    let text = custody().args(["top", "--once", "-i", "0.2", "--metrics", &url]).output().unwrap();
    let shown = String::from_utf8(text.stdout).unwrap();
    assert!(text.status.success() && shown.contains("custody top") && shown.contains("unsealed"), "{shown}");

    let refused = custody().args(["top", "--once", "--metrics", "http://127.0.0.1:1/metrics"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(3), "unreachable");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("metrics_listen"), "says how to turn them on");
    let tls = custody().args(["top", "--once", "--metrics", "https://127.0.0.1:1/metrics"]).output().unwrap();
    assert_eq!(tls.status.code(), Some(2), "only http:// (the listener is loopback, plain HTTP)");
    stop(dev);
}
