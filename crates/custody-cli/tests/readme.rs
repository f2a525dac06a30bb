//! The README's tour, verbatim: every line of the tour block runs against a real `custody dev`,
//! and lines marked "# fails:" must fail with the exit code they name.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

fn tour_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme.find("## A five-minute tour").expect("README has a tour");
    let block = &readme[start..];
    let open = block.find("```sh\n").unwrap() + 6;
    let close = block[open..].find("```").unwrap();
    block[open..open + close].lines().map(str::to_string).filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn the_readme_tour_works_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    // `target/release` in the README; here, wherever cargo put this test's binary.
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_custody")).parent().unwrap().to_path_buf();
    std::fs::create_dir_all(dir.path().join("target")).unwrap();
    std::os::unix::fs::symlink(&bin_dir, dir.path().join("target/release")).unwrap();

    let mut dev = common::custody()
        .current_dir(dir.path())
        .args(["--json", "dev", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = dev.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while serde_json::from_slice::<serde_json::Value>(&seen).is_err() {
        assert_eq!(out.read(&mut b).unwrap(), 1, "custody dev exited early");
        seen.push(b[0]);
    }

    let mut script = String::from("set -u\n");
    for (i, line) in tour_lines().iter().enumerate() {
        let (cmd, expect) = match line.split_once("# fails:") {
            Some((cmd, rest)) => {
                let code: String =
                    rest.split("(exit ").nth(1).unwrap().chars().take_while(char::is_ascii_digit).collect();
                (cmd.trim().to_string(), code)
            }
            None => (line.trim().to_string(), "0".to_string()),
        };
        // Each line runs in the same shell (so `export` and `source` carry over), inside braces so
        // its own redirections (`> secret.b64`) win over ours; its exit code is checked against
        // what the README promises.
        script.push_str(&format!(
            "{{ {cmd}\n}} >/dev/null 2>&1\nrc=$?\nif [ \"$rc\" != \"{expect}\" ]; then echo \"line {n}: exit $rc, README says {expect}: {esc}\"; exit 1; fi\n",
            n = i + 1,
            esc = cmd.replace('"', "'")
        ));
    }
    script.push_str("custody decrypt-blob -c app=tour secret.b64\n");
    let result = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env_remove("CUSTODY_PROFILE")
        .env_remove("CUSTODY_ENDPOINT")
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let _ = dev.kill();
    let _ = dev.wait();
    assert!(
        result.status.success(),
        "{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&result.stdout), "my database password");
}
