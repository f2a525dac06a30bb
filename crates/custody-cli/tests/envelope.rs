//! `custody encrypt` / `custody decrypt`: the Python SDK's vectors through the CLI, and files
//! encrypted under custody KMS keys of a real server.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine;
use serde_json::{json, Value};

fn vectors_dir() -> PathBuf {
    std::env::var("CUSTODY_TESTVECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testvectors"))
        .join("esdk-python")
}

fn run(args: &[&str], profile: Option<&Path>) -> Output {
    let mut c = common::custody();
    if let Some(p) = profile {
        c.env("CUSTODY_PROFILE", p);
    }
    c.args(args).output().unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), String::from_utf8_lossy(&o.stderr));
}

/// Every vector through `custody decrypt --raw-aes-key` (no server): "ok" ones give the
/// plaintext at the output path; "error" ones exit with "invalid ciphertext" (7) or "denied" (4,
/// no data key) and leave nothing at the output path, not even a partial file.
#[test]
fn the_python_sdk_vectors_through_the_cli() {
    let dir = vectors_dir();
    let manifest: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ring = &manifest["raw_aes_keyring"];
    let provider = ring["provider_id"].as_str().unwrap();
    for name in ["key-0", "key-1"] {
        let key = base64::engine::general_purpose::STANDARD.decode(ring["keys"][name].as_str().unwrap()).unwrap();
        std::fs::write(tmp.path().join(name), key).unwrap();
    }
    let mut seen = 0;
    for t in manifest["tests"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let key = t["wrapping_key"].as_str().unwrap();
        let spec = format!("{provider}/{key}={}", tmp.path().join(key).display());
        let out = tmp.path().join(format!("{name}.out"));
        let input = dir.join(t["ciphertext"].as_str().unwrap());
        let o = run(&["decrypt", "--raw-aes-key", &spec, "-o", out.to_str().unwrap(), input.to_str().unwrap()], None);
        if t["result"] == "ok" {
            ok(&o);
            let expected = std::fs::read(dir.join(t["plaintext"].as_str().unwrap())).unwrap();
            assert!(std::fs::read(&out).unwrap() == expected, "{name}: plaintext differs");
        } else {
            assert!(matches!(o.status.code(), Some(4) | Some(7)), "{name}: exit {:?}", o.status.code());
            assert!(!out.exists(), "{name}: output left behind");
        }
        seen += 1;
    }
    assert_eq!(seen, 89);
    // No temporary file was left behind either.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Files under custody KMS keys: round trips in both suites and several frame sizes, strict and
/// discovery decryption, two wrapping keys (either decrypts), a required context that does not
/// match (exit 7, nothing written), stdin to stdout, directories with -r, and a raw AES key beside
/// a KMS key.
#[tokio::test(flavor = "multi_thread")]
async fn files_under_kms_keys() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let profile_path = layout.admin_profile();
    let key = || async {
        let r = custody_client::Client::connect(&profile)
            .await
            .unwrap()
            .call("TrentService.CreateKey", json!({}))
            .await
            .unwrap();
        r["KeyMetadata"]["Arn"].as_str().unwrap().to_string()
    };
    let (a, b, other) = (key().await, key().await, key().await);
    let p = Some(profile_path.as_path());
    let tmp = tempfile::tempdir().unwrap();
    let path = |n: &str| tmp.path().join(n).display().to_string();
    let plain: Vec<u8> = (0..300_001u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(path("plain"), &plain).unwrap();

    for (suite, frame) in [("committed", "65536"), ("committed-signed", "4096"), ("committed", "1")] {
        let small = frame == "1";
        let input = if small { path("small") } else { path("plain") };
        if small {
            std::fs::write(&input, b"a few bytes").unwrap();
        }
        let expected = std::fs::read(&input).unwrap();
        ok(&run(
            &[
                "encrypt",
                "-k",
                &a,
                "-k",
                &b,
                "-c",
                "purpose=test",
                "--suite",
                suite,
                "--frame-size",
                frame,
                "-o",
                &path("enc"),
                &input,
            ],
            p,
        ));
        let message = std::fs::read(path("enc")).unwrap();
        assert_eq!(message[0], 2, "a v2 message");
        // Strict with either key, and discovery.
        for args in [vec!["-k", a.as_str()], vec!["-k", b.as_str()], vec!["--discovery"], vec![]] {
            let mut cmd = vec!["decrypt", "--require-context", "purpose=test", "-o", "dec"];
            let out = path("dec");
            cmd[4] = &out;
            cmd.extend(args.iter().copied());
            let enc = path("enc");
            cmd.push(&enc);
            ok(&run(&cmd, p));
            assert!(std::fs::read(path("dec")).unwrap() == expected, "{suite} {frame} {args:?}");
            std::fs::remove_file(path("dec")).unwrap();
        }
        // Strict with a key that did not wrap it: refused, nothing written.
        let o = run(&["decrypt", "-k", &other, "-o", &path("dec"), &path("enc")], p);
        assert_eq!(o.status.code(), Some(4), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(!Path::new(&path("dec")).exists());
        // A required context the message does not hold: refused, nothing written.
        let o = run(&["decrypt", "-k", &a, "--require-context", "purpose=other", "-o", &path("dec"), &path("enc")], p);
        assert_eq!(o.status.code(), Some(7), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("purpose=other"));
        assert!(!Path::new(&path("dec")).exists());
    }

    // A changed byte in the last frame: refused, and no partial plaintext at the output path.
    ok(&run(&["encrypt", "-k", &a, "--frame-size", "1024", "-o", &path("enc"), &path("plain")], p));
    let mut message = std::fs::read(path("enc")).unwrap();
    let n = message.len();
    message[n - 20] ^= 1;
    std::fs::write(path("bad"), &message).unwrap();
    let o = run(&["decrypt", "-k", &a, "-o", &path("dec"), &path("bad")], p);
    assert_eq!(o.status.code(), Some(7));
    assert!(!Path::new(&path("dec")).exists());

    // stdin to stdout.
    let mut child = common::custody()
        .env("CUSTODY_PROFILE", &profile_path)
        .args(["encrypt", "-k", &a])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"through pipes").unwrap();
    }
    let enc = child.wait_with_output().unwrap();
    ok(&enc);
    std::fs::write(path("piped"), &enc.stdout).unwrap();
    let dec = run(&["decrypt", "-k", &a, &path("piped")], p);
    ok(&dec);
    assert_eq!(dec.stdout, b"through pipes");

    // Directories: every file under the input, named *.encrypted, then back; with --json.
    std::fs::create_dir_all(tmp.path().join("tree/sub")).unwrap();
    std::fs::write(tmp.path().join("tree/one"), b"1").unwrap();
    std::fs::write(tmp.path().join("tree/sub/two"), b"22").unwrap();
    let o = run(&["--json", "encrypt", "-k", &a, "-r", &path("tree"), "--out-dir", &path("sealed")], p);
    ok(&o);
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["Files"].as_array().unwrap().len(), 2);
    assert!(tmp.path().join("sealed/sub/two.encrypted").exists());
    ok(&run(&["decrypt", "-r", &path("sealed"), "--out-dir", &path("opened"), "-v"], p));
    assert_eq!(std::fs::read(tmp.path().join("opened/one")).unwrap(), b"1");
    assert_eq!(std::fs::read(tmp.path().join("opened/sub/two")).unwrap(), b"22");

    // Data-key caching (opt-in): the files of one run share a data key (the same wrapped key in
    // every header), without it each has its own; all decrypt.
    let headers = |dir: &str| -> Vec<Vec<custody_crypto::esdk::EncryptedDataKey>> {
        let mut v: Vec<_> = walk(&tmp.path().join(dir))
            .iter()
            .map(|p| {
                let f = std::fs::read(p).unwrap();
                custody_crypto::esdk::read_header(&mut &f[..], &Default::default()).unwrap().encrypted_data_keys
            })
            .collect();
        v.dedup();
        v
    };
    ok(&run(&["encrypt", "-k", &a, "--cache-max-age", "60", "-r", &path("tree"), "--out-dir", &path("cached")], p));
    assert_eq!(headers("cached").len(), 1, "one data key for both files");
    assert_eq!(headers("sealed").len(), 2, "without a cache, a data key each");
    ok(&run(&["decrypt", "--cache-max-age", "60", "-r", &path("cached"), "--out-dir", &path("cached-out")], p));
    assert_eq!(std::fs::read(tmp.path().join("cached-out/sub/two")).unwrap(), b"22");
    let o = run(&["encrypt", "-k", &a, "--cache-max-messages", "2", &path("small")], p);
    assert_eq!(o.status.code(), Some(2), "the limits need --cache-max-age");

    // A KMS key and a raw AES key: the raw key alone decrypts offline (no server needed).
    std::fs::write(path("raw.key"), [9u8; 32]).unwrap();
    let raw = format!("acme/offline={}", path("raw.key"));
    ok(&run(&["encrypt", "-k", &a, "--raw-aes-key", &raw, "-o", &path("both"), &path("small")], p));
    let o = common::custody()
        .args(["decrypt", "--raw-aes-key", &raw, "--endpoint", "https://127.0.0.1:1", &path("both")])
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(o.stdout, b"a few bytes");

    // Usage errors say what to do.
    let o = run(&["encrypt", "-o", &path("x"), &path("small")], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("-k KEY"));
    let o = run(&["encrypt", "-k", &a, &path("small"), &path("plain")], p);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out-dir"));
    server.shutdown().await;
}

/// `custody rewrap`: after a rotation, files move to the key's current version (only headers
/// change); a second run finds nothing to do; moving to another key makes the old one useless
/// for them; a dry run changes nothing; a journal lets a run resume; a signed message is refused
/// and reported, the others still done.
#[tokio::test(flavor = "multi_thread")]
async fn rewrap_moves_files_to_the_current_version_or_another_key() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let profile_path = layout.admin_profile();
    let p = Some(profile_path.as_path());
    let mut admin = common::admin_client(&profile).await;
    let mut create = async || common::create_key(&mut admin, "Arn").await;
    let (a, b) = (create().await, create().await);
    let tmp = tempfile::tempdir().unwrap();
    let files = tmp.path().join("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    let mut originals = Vec::new();
    for i in 0..5 {
        let name = if i < 2 { format!("sub/f{i}") } else { format!("f{i}") };
        let plain: Vec<u8> = (0..(i * 50_000 + 1)).map(|j| (j % 199) as u8).collect();
        let src = tmp.path().join(format!("plain{i}"));
        std::fs::write(&src, &plain).unwrap();
        let out = files.join(&name);
        ok(&run(&["encrypt", "-k", &a, "--frame-size", "4096", "-o", out.to_str().unwrap(), src.to_str().unwrap()], p));
        originals.push((out, plain, std::fs::read(files.join(&name)).unwrap()));
    }
    let rewrap = |args: &[&str]| {
        let mut all = vec!["--json", "rewrap"];
        all.extend_from_slice(args);
        let o = run(&all, p);
        (o.status.code(), serde_json::from_slice::<Value>(&o.stdout).unwrap_or(Value::Null), o)
    };
    let files_arg = files.to_str().unwrap().to_string();

    // Only regular files are rewritten in place: a link or a pipe given by name is refused,
    // and left as it is.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&originals[2].0, &link).unwrap();
    let fifo = tmp.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for (special, why) in [(&link, "is a symbolic link"), (&fifo, "is not a regular file")] {
        let (code, _, o) = rewrap(&["-k", &a, special.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains(why), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(&fifo).unwrap().file_type()));

    // Nothing to do yet: every file is under a's current version.
    let (code, r, o) = rewrap(&["-k", &a, &files_arg]);
    assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!((r["AlreadyDone"].as_u64(), r["Rewrapped"].as_u64()), (Some(5), Some(0)), "{r}");

    // After a rotation: a dry run changes nothing, then all five are re-wrapped, bodies untouched.
    admin.call("TrentService.RotateKeyOnDemand", json!({ "KeyId": a })).await.unwrap();
    let (_, r, _) = rewrap(&["-k", &a, "--dry-run", &files_arg]);
    assert_eq!(r["WouldRewrap"].as_u64(), Some(5), "{r}");
    for (path, _, before) in &originals {
        assert_eq!(&std::fs::read(path).unwrap(), before, "a dry run changed {}", path.display());
    }
    let (code, r, _) = rewrap(&["-k", &a, "--concurrency", "3", "--rate", "1000", &files_arg]);
    assert_eq!((code, r["Rewrapped"].as_u64()), (Some(0), Some(5)), "{r}");
    for (path, plain, before) in &originals {
        let after = std::fs::read(path).unwrap();
        assert_ne!(&after, before);
        let body = body_len(plain.len(), 4096);
        assert_eq!(after[after.len() - body..], before[before.len() - body..], "the body changed");
        let o = run(&["decrypt", "-k", &a, path.to_str().unwrap()], p);
        ok(&o);
        assert!(&o.stdout == plain);
    }
    let (_, r, _) = rewrap(&["-k", &a, &files_arg]);
    assert_eq!(r["AlreadyDone"].as_u64(), Some(5), "{r}");

    // To another key, with a journal: a's data keys are gone from the files.
    let journal = tmp.path().join("journal");
    let journal_arg = journal.to_str().unwrap().to_string();
    let (code, r, _) = rewrap(&["-k", &b, "--from", &a, "--resume", &journal_arg, &files_arg]);
    assert_eq!((code, r["Rewrapped"].as_u64()), (Some(0), Some(5)), "{r}");
    assert_eq!(std::fs::read_to_string(&journal).unwrap().lines().count(), 5);
    for (path, plain, _) in &originals {
        let o = run(&["decrypt", "-k", &b, path.to_str().unwrap()], p);
        ok(&o);
        assert!(&o.stdout == plain);
        let o = run(&["decrypt", "-k", &a, path.to_str().unwrap()], p);
        assert_eq!(o.status.code(), Some(4));
    }
    // Resuming with the journal skips them all (without even reading them).
    let (_, r, _) = rewrap(&["-k", &a, "--from", &b, "--resume", &journal_arg, &files_arg]);
    assert_eq!(r["InJournal"].as_u64(), Some(5), "{r}");

    // A signed message is refused (reported with its path); the rest of the run goes on.
    let signed = files.join("signed");
    ok(&run(
        &[
            "encrypt",
            "-k",
            &b,
            "--suite",
            "committed-signed",
            "-o",
            signed.to_str().unwrap(),
            originals[0].0.to_str().unwrap(),
        ],
        p,
    ));
    let (code, r, _) = rewrap(&["-k", &a, &files_arg]);
    assert_eq!(code, Some(7), "{r}");
    assert_eq!(r["Rewrapped"].as_u64(), Some(5), "{r}");
    let failed = r["Failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["Error"].as_str().unwrap().contains("signed"), "{r}");
    server.shutdown().await;
}

/// An output path that is a device, a pipe or a descriptor is streamed to, never replaced:
/// `/dev/null` stays the null device, `/dev/stdout` a link whose output reaches the process's
/// stdout (a pipe or a file), and a FIFO's reader gets the whole message (and the plaintext).
#[test]
fn outputs_to_devices_and_pipes_are_streamed_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    let raw = raw_key(tmp.path(), 9);
    let plain: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let input = tmp.path().join("plain");
    std::fs::write(&input, &plain).unwrap();
    let input = input.to_str().unwrap();

    ok(&run(&["encrypt", "--raw-aes-key", &raw, "-o", "/dev/null", input], None));
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device(), "/dev/null was replaced");

    let fifo = tmp.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let through_fifo = |args: &[&str]| {
        let path = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::read(path).unwrap());
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", fifo.to_str().unwrap()]);
        let o = run(&all, None);
        // Checked before waiting for the reader: had the FIFO been replaced, it would wait forever.
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
        ok(&o);
        reader.join().unwrap()
    };
    // `-o /dev/stdout` writes to the descriptor, a pipe or a file, and leaves the link alone.
    let piped = run(&["encrypt", "--raw-aes-key", &raw, "-o", "/dev/stdout", input], None);
    ok(&piped);
    let redirected = tmp.path().join("redirected");
    let status = common::custody()
        .args(["encrypt", "--raw-aes-key", &raw, "-o", "/dev/stdout", input])
        .stdout(std::fs::File::create(&redirected).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::symlink_metadata("/dev/stdout").unwrap().is_symlink(), "/dev/stdout was replaced");
    for message in [piped.stdout, std::fs::read(&redirected).unwrap()] {
        let enc = tmp.path().join("via-stdout");
        std::fs::write(&enc, &message).unwrap();
        let o = run(&["decrypt", "--raw-aes-key", &raw, enc.to_str().unwrap()], None);
        ok(&o);
        assert!(o.stdout == plain);
    }

    let message = through_fifo(&["encrypt", "--raw-aes-key", &raw, input]);
    let enc = tmp.path().join("enc");
    std::fs::write(&enc, &message).unwrap();
    assert_eq!(through_fifo(&["decrypt", "--raw-aes-key", &raw, enc.to_str().unwrap()]), plain);
}

/// A pipe on stdin or stdout is widened to a MiB (Linux makes it 64 KiB), so that streams move
/// a MiB per system call; what goes through is exactly the message and its plaintext.
#[test]
fn pipes_on_stdin_and_stdout_are_widened() {
    use custody_server::output::{pipe_size, PIPE_SIZE};
    use std::io::{Read, Write};
    let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size").unwrap().trim().parse().unwrap();
    assert!(max >= PIPE_SIZE, "this test needs pipe-max-size of at least {PIPE_SIZE} (it is {max})");
    let tmp = tempfile::tempdir().unwrap();
    let raw = raw_key(tmp.path(), 5);
    let plain: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();

    // A pipe's size, seen from this process's end of it, while custody runs with the other end.
    let through = |args: &[&str], input: &[u8]| -> (Vec<u8>, usize, usize) {
        let (in_r, mut in_w) = std::io::pipe().unwrap();
        let (mut out_r, out_w) = std::io::pipe().unwrap();
        // Read ends: holding one does not keep custody from seeing the end of its input.
        let (in_seen, out_seen) = (in_r.try_clone().unwrap(), out_r.try_clone().unwrap());
        assert_eq!(pipe_size(&in_seen), Some(64 << 10), "a new pipe holds 64 KiB");
        let mut child = common::custody().args(args).stdin(in_r).stdout(out_w).spawn().unwrap();
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || {
            in_w.write_all(&input).unwrap();
        });
        let mut output = Vec::new();
        out_r.read_to_end(&mut output).unwrap();
        let (in_size, out_size) = (pipe_size(&in_seen).unwrap(), pipe_size(&out_seen).unwrap());
        feeder.join().unwrap();
        assert!(child.wait().unwrap().success());
        (output, in_size, out_size)
    };
    let (message, in_size, out_size) = through(&["encrypt", "--raw-aes-key", &raw, "-"], &plain);
    assert_eq!((in_size, out_size), (PIPE_SIZE, PIPE_SIZE), "stdin and stdout widened (encrypt)");
    let (back, in_size, out_size) = through(&["decrypt", "--raw-aes-key", &raw, "-"], &message);
    assert_eq!((in_size, out_size), (PIPE_SIZE, PIPE_SIZE), "stdin and stdout widened (decrypt)");
    assert!(back == plain, "the plaintext came back whole");
}

/// Stdin redirected from a regular file (`custody encrypt < big`) is read at offsets, as a file
/// named on the command line is, and left at its end, where reading it through would have left
/// it; from elsewhere in the file it is a stream read from there.
#[test]
fn stdin_from_a_file_is_read_at_offsets_and_left_at_its_end() {
    use std::io::{Seek, SeekFrom};
    let tmp = tempfile::tempdir().unwrap();
    let raw = raw_key(tmp.path(), 4);
    let plain: Vec<u8> = (0..3_000_000u32).map(|i| (i % 249) as u8).collect();
    let input = tmp.path().join("plain");
    std::fs::write(&input, &plain).unwrap();
    // Runs custody (under strace, which lists its pread64 calls on `path`) with stdin at `at` in `path`;
    // returns its output, where the shared offset was left, and whether it read at offsets.
    let run_from = |args: &[&str], path: &std::path::Path, at: u64| {
        let mut stdin = std::fs::File::open(path).unwrap();
        stdin.seek(SeekFrom::Start(at)).unwrap();
        let mut seen = stdin.try_clone().unwrap();
        let trace = tmp.path().join("trace");
        let out = std::process::Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=pread64", "-P"])
            .arg(path) // only calls on the input file (not the loader's on libraries)
            .arg("-o")
            .arg(&trace)
            .arg(common::custody().get_program())
            .args(args)
            .stdin(stdin)
            .output()
            .expect("strace (Debian package strace)");
        ok(&out);
        let pread = std::fs::read_to_string(&trace).unwrap().contains("pread64(");
        (out.stdout, seen.stream_position().unwrap(), pread)
    };
    let (message, offset, pread) = run_from(&["encrypt", "--raw-aes-key", &raw], &input, 0);
    assert!(pread, "read at offsets");
    assert_eq!(offset, plain.len() as u64, "left at the end");
    let enc = tmp.path().join("enc");
    std::fs::write(&enc, &message).unwrap();
    let (back, offset, pread) = run_from(&["decrypt", "--raw-aes-key", &raw], &enc, 0);
    assert!(pread && back == plain, "decrypted at offsets, whole");
    assert_eq!(offset, message.len() as u64);

    // A script read the first 1,000 bytes itself: the rest is encrypted, as a stream.
    let (message, offset, pread) = run_from(&["encrypt", "--raw-aes-key", &raw], &input, 1000);
    assert!(!pread, "a stream from where the descriptor was");
    assert_eq!(offset, plain.len() as u64);
    std::fs::write(&enc, &message).unwrap();
    let (back, _, _) = run_from(&["decrypt", "--raw-aes-key", &raw], &enc, 0);
    assert!(back == plain[1000..], "the bytes after the first 1,000");
}

/// Large outputs (64 MiB and more) are written with direct I/O: the bytes go to the disk, not
/// through the page cache (`fincore` shows at most the last chunk resident), and the files are
/// exactly what a stream gives.
#[test]
fn large_outputs_go_straight_to_the_disk_and_are_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = raw_key(tmp.path(), 5);
    // Not a multiple of anything: the frames (4000 bytes) and the writes' blocks never line up.
    let plain: Vec<u8> = (0..(64 << 20) + 12_345u32).map(|i| (i % 253) as u8 ^ (i >> 13) as u8).collect();
    let input = tmp.path().join("plain");
    std::fs::write(&input, &plain).unwrap();
    let (enc, dec) = (tmp.path().join("plain.encrypted"), tmp.path().join("plain.decrypted"));
    let resident = |p: &Path| -> u64 {
        let o = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(p)
            .output()
            .expect("fincore (util-linux)");
        String::from_utf8(o.stdout).unwrap().trim().parse().unwrap()
    };
    let direct = std::env::var_os("CUSTODY_TEST_NO_DIRECT_IO").is_none();

    ok(&run(
        &[
            "encrypt",
            "--raw-aes-key",
            &raw,
            "--frame-size",
            "4000",
            "-o",
            enc.to_str().unwrap(),
            input.to_str().unwrap(),
        ],
        None,
    ));
    let size = std::fs::metadata(&enc).unwrap().len();
    if direct {
        assert!(resident(&enc) <= 4 << 20, "{} of {size} bytes in the page cache", resident(&enc));
    }
    ok(&run(&["decrypt", "--raw-aes-key", &raw, "-o", dec.to_str().unwrap(), enc.to_str().unwrap()], None));
    if direct {
        assert!(resident(&dec) <= 4 << 20, "{} bytes of the plaintext in the page cache", resident(&dec));
    }
    assert!(std::fs::read(&dec).unwrap() == plain, "the plaintext round trips");
    // The same message through a stream: the decryption of stdin to stdout agrees.
    let streamed = common::custody()
        .args(["decrypt", "--raw-aes-key", &raw, "-"])
        .stdin(std::fs::File::open(&enc).unwrap())
        .output()
        .unwrap();
    ok(&streamed);
    assert!(streamed.stdout == plain);
}

/// A new output file survives a crash only if its directory entry does: after renaming the staged
/// file onto the output path, custody fsyncs the directory (`strace` shows the calls), for an
/// output named relative to the working directory and for one in another directory.
#[test]
fn the_directory_is_synced_after_an_output_is_renamed_into_it() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("key"), [3u8; 32]).unwrap();
    std::fs::write(tmp.path().join("plain"), b"kept after a crash").unwrap();
    let sub = tmp.path().join("sub");
    for (out, dir) in [
        ("plain.encrypted".to_string(), ".".to_string()),
        (format!("{}/out", sub.display()), sub.display().to_string()),
    ] {
        // One trace file per thread (`-ff`): the rename and the directory's sync happen on one
        // thread, and no other thread's calls split its lines.
        let traces = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("strace")
            .current_dir(tmp.path())
            .args(["-ff", "-qq", "-e", "trace=openat,rename,renameat,renameat2,fsync", "-o"])
            .arg(traces.path().join("t"))
            .arg(common::custody().get_program())
            .args(["encrypt", "--raw-aes-key", "t/k=key", "-o", &out, "plain"])
            .status()
            .expect("strace (Debian package strace)");
        assert!(status.success());
        let threads: Vec<String> = std::fs::read_dir(traces.path())
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        let is_rename = |l: &&str| l.contains("rename") && l.contains(&format!("\"{out}\"")) && l.ends_with("= 0");
        let trace = threads
            .iter()
            .find(|t| t.lines().any(|l| is_rename(&l)))
            .unwrap_or_else(|| panic!("no rename onto {out}:\n{threads:#?}"));
        let after: Vec<&str> = trace.lines().skip_while(|l| !is_rename(l)).collect();
        let fd = after
            .iter()
            .find(|l| l.contains("openat(") && l.contains(&format!("\"{dir}\"")))
            .and_then(|l| l.rsplit("= ").next()?.trim().parse::<u32>().ok())
            .unwrap_or_else(|| panic!("{dir} not opened after the rename:\n{trace}"));
        assert!(
            after.iter().any(|l| l.contains(&format!("fsync({fd})")) && l.ends_with("= 0")),
            "{dir} not fsynced after the rename:\n{trace}"
        );
    }
}

/// Writes a 32-byte raw AES key of `byte`s into `dir` and returns its `--raw-aes-key` spec.
fn raw_key(dir: &Path, byte: u8) -> String {
    let key = dir.join("key");
    std::fs::write(&key, [byte; 32]).unwrap();
    format!("t/k={}", key.display())
}

fn body_len(len: usize, frame: usize) -> usize {
    let full = if len > 0 && len.is_multiple_of(frame) { len / frame - 1 } else { len / frame };
    let last = len - full * frame;
    full * (4 + 12 + frame + 16) + (4 + 4 + 12 + 4 + last + 16)
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
