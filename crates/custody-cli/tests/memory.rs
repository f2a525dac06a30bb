//! The running server keeps secrets out of swap and core dumps: its memory is locked and it
//! cannot dump core, as /proc shows; without a way to lock its memory it refuses to start, unless
//! `danger_allow_swap` says otherwise (and then says that memory is not locked).

mod common;

use std::process::Stdio;

fn proc_field(pid: u32, file: &str, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} not in {file}:\n{text}")).to_string()
}

/// Kilobytes of the process's locked memory (`VmLck` in /proc/PID/status).
fn locked_kb(pid: u32) -> u64 {
    proc_field(pid, "status", "VmLck:").split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_running_server_locks_its_memory_and_cannot_dump_core() {
    let (_dir, layout) = common::keyfile_dir();
    // Production settings: no danger_allow_swap. This machine's containers have CAP_IPC_LOCK
    // (RLIMIT_MEMLOCK does not bind then); the server would refuse to start otherwise.
    let server = common::spawn_server_with(&layout.data_dir, &[("CUSTODY_DANGER_ALLOW_SWAP", "false")]);
    let pid = server.child.id();
    // Soft and hard limits 0: not even the process itself can turn core dumps back on.
    let core = proc_field(pid, "limits", "Max core file size");
    assert_eq!(core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(), ["0", "0"], "{core}");
    // Memory in use is locked (pages are locked as they are touched, MCL_ONFAULT), and grows
    // with the work the server does.
    let before = locked_kb(pid);
    assert!(before > 1024, "VmLck {before} kB");
    let all: Vec<String> = server.stderr_lines.iter().chain(server.log.lock().unwrap().iter()).cloned().collect();
    assert!(!all.iter().any(|l| l.contains("NOT locked")), "{all:#?}");
    eprintln!("VmLck: {before} kB");
    server.terminate();
}

#[test]
fn without_a_way_to_lock_memory_the_server_refuses_to_start_unless_told_otherwise() {
    let (_dir, layout) = common::keyfile_dir();
    // A 64 KiB locked-memory limit, and no capability to raise it or to lock beyond it.
    let run = |allow_swap: &str| {
        let custody = common::custody();
        let mut c = std::process::Command::new("prlimit");
        c.args(["--memlock=65536", "--", "setpriv", "--bounding-set", "-sys_resource,-ipc_lock", "--"])
            .arg(custody.get_program())
            .args(["server", "--listen", "127.0.0.1:0", "--data"])
            .arg(&layout.data_dir)
            .env_remove("CUSTODY_PROFILE")
            .env("RUST_LOG", "warn")
            .env("CUSTODY_DANGER_ALLOW_SWAP", allow_swap)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c.spawn().expect("prlimit and setpriv (util-linux)")
    };
    let out = run("false").wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("RLIMIT_MEMLOCK") && err.contains("ulimit -l unlimited") && err.contains("danger_allow_swap"),
        "{err}"
    );

    // Told otherwise: it starts, and says memory is not locked.
    let mut child = run("true");
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen = Vec::new();
    let listening = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("custody listening on") => break true,
            Some(Ok(l)) => seen.push(l),
            _ => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "{seen:#?}");
    assert!(seen.iter().any(|l| l.contains("danger_allow_swap") && l.contains("NOT locked")), "{seen:#?}");
}
