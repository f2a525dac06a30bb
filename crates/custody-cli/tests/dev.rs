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
