//! `custody encrypt` and `custody decrypt`: files and streams in the AWS Encryption SDK message
//! format (custody_crypto::esdk), with data keys from custody KMS keys and/or raw AES keys.
//!
//! Output goes to a temporary file beside the destination, renamed into place only once the
//! message is complete (and, decrypting, authenticated through its last frame and signature), so
//! no partial output ever lands at the output path. To stdout (`-o -`), and to an output path
//! that is a descriptor, a device or a pipe (`/dev/stdout`, `/dev/null`, a FIFO), the plaintext
//! streams frame by frame; a caller that must not act on unverified plaintext writes to a file.

use std::io::{BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Args, ValueEnum};
use custody_client::{Discovery, KmsKeyring};
use custody_crypto::esdk::{
    self, EncryptOptions, EncryptionContext, EsdkError, Keyring, MultiKeyring, RawAesKeyring, ReadAt, Suite,
};
use serde_json::json;

use crate::commands::{connect, parse_pair, print_json};
use crate::exit::{self, CliError};
use crate::ConnArgs;
use custody_crypto::BlobHeader;
use custody_server::output::{widen_pipe, OutputFile};
use custody_server::{AtomicFile, OutputTarget};

type Result<T> = std::result::Result<T, CliError>;

/// Inputs at least this large get a progress bar (on a terminal).
const PROGRESS_FROM: u64 = 64 * 1024 * 1024;

/// The algorithm suite to encrypt with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SuiteArg {
    /// 0x0478: AES-256-GCM, HKDF-SHA512, key commitment (the SDKs' default).
    Committed,
    /// 0x0578: the same, and an ECDSA P-384 signature (for readers who must not be able to
    /// encrypt).
    CommittedSigned,
}

/// Where the keys come from, shared by both commands.
#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// A custody KMS key: id, ARN or alias (repeatable). Encrypting, the first generates the data
    /// key and each wraps it; decrypting, only data keys of these keys are tried (strict mode).
    #[arg(short = 'k', long = "key", value_name = "KEY")]
    pub keys: Vec<String>,
    /// A raw AES-256 wrapping key, as the AWS Encryption SDKs' raw AES keyring: provider id, key
    /// name, and a file holding the 32 key bytes (raw, or base64). Repeatable; works offline.
    #[arg(long = "raw-aes-key", value_name = "PROVIDER/NAME=KEYFILE")]
    pub raw_aes_keys: Vec<String>,
    /// Print a one-line summary per file (bytes, time, throughput) on stderr.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Write the output here (`-` for stdout). Only with a single input; default: stdout. A file
    /// is written whole or not at all; a descriptor, a device or a pipe (`/dev/stdout`,
    /// `/dev/null`, a FIFO) is streamed to.
    #[arg(short = 'o', long = "out", value_name = "OUT", conflicts_with = "out_dir")]
    pub out: Option<String>,
    /// Write one output per input into this directory (several inputs, or -r).
    #[arg(long = "out-dir", value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Inputs are directories: process every file under them (needs --out-dir).
    #[arg(short = 'r', long, requires = "out_dir")]
    pub recursive: bool,
    /// Data-key caching (off by default: every message gets its own data key): reuse a data key
    /// for messages with the same context (encrypt), or an unwrapped one (decrypt), for at most
    /// SECONDS. Saves KMS calls on many small files.
    #[arg(long = "cache-max-age", value_name = "SECONDS")]
    pub cache_max_age: Option<u64>,
    /// With caching: messages per data key at most.
    #[arg(long = "cache-max-messages", value_name = "N", requires = "cache_max_age", default_value_t = 1 << 32)]
    pub cache_max_messages: u64,
    /// With caching: bytes per data key at most.
    #[arg(long = "cache-max-bytes", value_name = "N", requires = "cache_max_age", default_value_t = u64::MAX)]
    pub cache_max_bytes: u64,
    /// Input files, or - for stdin (default).
    #[arg(default_value = "-")]
    pub inputs: Vec<String>,
}

/// `custody encrypt`
#[derive(Debug, Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    keys: KeyArgs,
    /// Encryption context pair KEY=VALUE (repeatable): authenticated, stored in the clear in the
    /// message, passed to the KMS with every data key.
    #[arg(short = 'c', long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// Algorithm suite.
    #[arg(long, value_enum, default_value = "committed")]
    suite: SuiteArg,
    /// Plaintext bytes per frame.
    #[arg(long = "frame-size", default_value_t = esdk::DEFAULT_FRAME_LENGTH, value_parser = clap::value_parser!(u32).range(1..))]
    frame_size: u32,
}

/// `custody decrypt`
#[derive(Debug, Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    keys: KeyArgs,
    /// Refuse the message unless its encryption context holds KEY=VALUE (repeatable).
    #[arg(long = "require-context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    require_context: Vec<(String, String)>,
    /// Try the data keys of any custody key this identity may use (discovery mode); the default
    /// when neither -k nor --raw-aes-key is given.
    #[arg(long)]
    discovery: bool,
    /// Most encrypted data keys a message may carry.
    #[arg(long = "max-encrypted-data-keys", default_value_t = 16)]
    max_encrypted_data_keys: u16,
}

/// One job: where from, where to.
struct Job {
    input: String,
    /// `None`: stdout.
    output: Option<PathBuf>,
}

/// Turns inputs and output flags into jobs.
fn plan(k: &KeyArgs, suffix: Suffix) -> Result<Vec<Job>> {
    let usage = |m: String| CliError::new(exit::USAGE, m);
    let Some(dir) = &k.out_dir else {
        if k.inputs.len() > 1 {
            return Err(usage("several inputs need --out-dir DIR".into()));
        }
        let output = match k.out.as_deref() {
            None | Some("-") => None,
            Some(p) => Some(PathBuf::from(p)),
        };
        return Ok(vec![Job { input: k.inputs[0].clone(), output }]);
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot create {}: {e}", dir.display())))?;
    let mut jobs = Vec::new();
    for input in &k.inputs {
        if input == "-" {
            return Err(usage("stdin (-) cannot be used with --out-dir".into()));
        }
        let path = Path::new(input);
        if path.is_dir() {
            if !k.recursive {
                return Err(usage(format!("{input} is a directory; add -r to process the files under it")));
            }
            for file in walk(path)? {
                let rel = file.strip_prefix(path).expect("walked from path");
                jobs.push(Job { input: file.display().to_string(), output: Some(suffix.apply(&dir.join(rel))) });
            }
        } else {
            let name = path.file_name().ok_or_else(|| usage(format!("{input} names no file")))?;
            jobs.push(Job { input: input.clone(), output: Some(suffix.apply(&dir.join(name))) });
        }
    }
    Ok(jobs)
}

/// Every regular file under `dir`, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read {}: {e}", d.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| CliError::new(exit::FAILURE, format!("cannot read {}: {e}", d.display())))?;
            let kind = entry.file_type().map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// How output names derive from input names with --out-dir.
#[derive(Clone, Copy)]
enum Suffix {
    /// `x` → `x.encrypted`
    Add,
    /// `x.encrypted` → `x`, anything else → `x.decrypted`
    Strip,
}

impl Suffix {
    fn apply(self, p: &Path) -> PathBuf {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let new = match self {
            Suffix::Add => format!("{name}.encrypted"),
            Suffix::Strip => match name.strip_suffix(".encrypted") {
                Some(stem) if !stem.is_empty() => stem.to_string(),
                _ => format!("{name}.decrypted"),
            },
        };
        p.with_file_name(new)
    }
}

/// Parses `PROVIDER/NAME=KEYFILE` and reads the key.
fn raw_keyring(spec: &str) -> Result<RawAesKeyring> {
    let usage = || CliError::new(exit::USAGE, format!("--raw-aes-key wants PROVIDER/NAME=KEYFILE, got {spec:?}"));
    let (id, file) = spec.split_once('=').ok_or_else(usage)?;
    let (provider, name) = id.split_once('/').ok_or_else(usage)?;
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(file)
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read the key file {file}: {e}")))?,
    );
    let key = if bytes.len() == 32 {
        bytes
    } else {
        let text = std::str::from_utf8(&bytes).unwrap_or("").trim();
        zeroize::Zeroizing::new(B64.decode(text).map_err(|_| {
            CliError::new(exit::INVALID_REQUEST, format!("{file} holds neither 32 raw bytes nor base64 of 32 bytes"))
        })?)
    };
    RawAesKeyring::new(provider, name, &key).map_err(|e| CliError::new(exit::INVALID_REQUEST, format!("{file}: {e}")))
}

/// What a keyring is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Encrypt,
    /// With `--discovery` (also the default when no key at all is given).
    Decrypt {
        discovery: bool,
    },
}

/// The keyring the flags describe: KMS keys first (the first generates), then raw keys.
async fn keyring(conn: &ConnArgs, k: &KeyArgs, purpose: Purpose) -> Result<Box<dyn Keyring>> {
    let mut rings: Vec<Box<dyn Keyring>> = Vec::new();
    let discovery = purpose == Purpose::Decrypt { discovery: true }
        || (purpose != Purpose::Encrypt && k.keys.is_empty() && k.raw_aes_keys.is_empty());
    if !k.keys.is_empty() || discovery {
        let mut client = connect(conn).await?;
        let any = || Discovery::Any { arn_prefixes: Vec::new() };
        let (encrypt_keys, decrypt) = match purpose {
            Purpose::Encrypt => (k.keys.clone(), any()),
            Purpose::Decrypt { .. } if discovery => (Vec::new(), any()),
            Purpose::Decrypt { .. } => {
                let mut arns = Vec::new();
                for key in &k.keys {
                    arns.push(KmsKeyring::resolve_arn(&mut client, key).await?);
                }
                (Vec::new(), Discovery::Strict(arns))
            }
        };
        rings.push(Box::new(KmsKeyring::new(client, tokio::runtime::Handle::current(), encrypt_keys, decrypt)));
    }
    for spec in &k.raw_aes_keys {
        rings.push(Box::new(raw_keyring(spec)?));
    }
    if rings.is_empty() {
        return Err(CliError::new(
            exit::USAGE,
            "give a key: -k KEY (custody KMS) or --raw-aes-key PROVIDER/NAME=KEYFILE",
        ));
    }
    let keyring: Box<dyn Keyring> = if rings.len() == 1 {
        rings.pop().expect("one")
    } else {
        Box::new(MultiKeyring::new(rings).expect("not empty"))
    };
    Ok(match k.cache_max_age {
        None => keyring,
        Some(seconds) => Box::new(custody_client::CachingKeyring::new(
            keyring,
            custody_client::CacheLimits {
                max_age: std::time::Duration::from_secs(seconds),
                max_messages: k.cache_max_messages,
                max_bytes: k.cache_max_bytes,
                ..Default::default()
            },
        )),
    })
}

/// Maps a format error to an exit code and a message that says what to do.
fn esdk_error(input: &str, e: EsdkError) -> CliError {
    let code = match &e {
        EsdkError::Malformed(_) | EsdkError::Unsupported(_) | EsdkError::Integrity(_) => exit::INVALID_CIPHERTEXT,
        EsdkError::ContextMismatch(_) => exit::INVALID_CIPHERTEXT,
        EsdkError::NoDataKey(_) => exit::DENIED,
        EsdkError::Invalid(_) => exit::INVALID_REQUEST,
        EsdkError::Keyring(_) | EsdkError::Io(_) => exit::FAILURE,
        _ => exit::FAILURE,
    };
    let hint = match &e {
        EsdkError::NoDataKey(_) => {
            "\nhint: decrypt with one of the keys listed (-k KEY or --raw-aes-key), or --discovery"
        }
        _ => "",
    };
    CliError::new(code, format!("{input}: {e}{hint}"))
}

/// Starts an output file beside `dest` (its directory made if needed): see [`AtomicFile`].
fn stage(dest: &Path) -> Result<AtomicFile> {
    let fail = |e: std::io::Error| CliError::new(exit::FAILURE, format!("cannot create {}: {e}", dest.display()));
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    AtomicFile::create(dest, None).map_err(fail)
}

/// Finishes an output file: writes the rest, fsyncs, renames it into place.
fn commit(out: OutputFile, dest: &Path) -> Result<()> {
    let fail = |e: std::io::Error| CliError::new(exit::FAILURE, format!("cannot write {}: {e}", dest.display()));
    out.commit().map_err(fail)
}

/// Where an output that is not staged goes: stdout (no path, or `/dev/stdout`), stderr, or the
/// path opened in place (another descriptor, a device, a pipe; a directory fails, saying so).
pub(crate) fn stream_output(dest: Option<&Path>, target: OutputTarget) -> std::io::Result<Box<dyn Write>> {
    Ok(match (dest, target) {
        (None, _) | (_, OutputTarget::Descriptor(1)) => {
            widen_pipe(std::io::stdout());
            Box::new(std::io::stdout().lock())
        }
        (_, OutputTarget::Descriptor(2)) => Box::new(std::io::stderr().lock()),
        (Some(dest), _) => {
            let f = std::fs::OpenOptions::new().write(true).open(dest)?;
            widen_pipe(&f);
            Box::new(f)
        }
    })
}

/// What one job did.
struct Done {
    input: String,
    output: String,
    bytes_in: u64,
    bytes_out: u64,
    seconds: f64,
    context: Option<EncryptionContext>,
}

/// What a job reads: a regular file, read at offsets by every core, or a stream (stdin, a pipe).
enum Source<'a> {
    File(&'a dyn ReadAt, u64),
    Stream(&'a mut dyn Read),
}

/// What a job does with its input and output: the message's encryption context, or why not.
type Work<'a> = dyn Fn(Source<'_>, &mut dyn Write) -> std::result::Result<Option<EncryptionContext>, EsdkError> + 'a;

/// Runs `work(source, writer)` for one job, with staging, progress and accounting.
fn run_job(job: &Job, what: &str, buffered: bool, work: &Work<'_>) -> Result<Done> {
    let started = Instant::now();
    let file = if job.input == "-" {
        stdin_file().map(|(f, len)| (f, Some(len)))
    } else {
        let f = std::fs::File::open(&job.input)
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read {}: {e}", job.input)))?;
        let size = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
        Some((f, size))
    };
    let bar = match file.as_ref().and_then(|(_, size)| *size) {
        Some(n) if n >= PROGRESS_FROM && std::io::stderr().is_terminal() => {
            let bar = indicatif::ProgressBar::new(n);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{what} {{bar:30}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
                ))
                .expect("a valid template"),
            );
            Some(bar)
        }
        _ => None,
    };
    let read = AtomicU64::new(0);
    // Not a regular file (stdin, a pipe, a device): a stream. Encrypting reads whole frames
    // straight into their buffers; decrypting reads small fields too, which a buffer saves a
    // system call each.
    let stream = |r: &mut dyn Read, out: &mut dyn Write| {
        if buffered {
            work(Source::Stream(&mut BufReader::with_capacity(1 << 20, r)), out)
        } else {
            work(Source::Stream(r), out)
        }
    };
    let run = |out: &mut dyn Write| match &file {
        Some((f, Some(len))) => work(Source::File(&CountedFile { inner: f, n: &read, bar: bar.clone() }, *len), out),
        Some((f, None)) => {
            widen_pipe(f);
            stream(&mut Counted { inner: f, n: &read }, out)
        }
        None => {
            widen_pipe(std::io::stdin());
            stream(&mut Counted { inner: std::io::stdin().lock(), n: &read }, out)
        }
    };
    // A file is staged and renamed into place. Stdout, another descriptor (`/dev/stdout`), a
    // device or a pipe (`/dev/null`, a FIFO) is written to as a stream: renaming a staged file
    // onto it would replace it.
    let target = job.output.as_deref().map_or(OutputTarget::Descriptor(1), custody_server::output_target);
    let (context, bytes_out) = match (&job.output, target) {
        (Some(dest), OutputTarget::File) => {
            // About as large as the input, whichever way.
            let expected = file.as_ref().and_then(|(_, size)| *size);
            let mut out = Counting { inner: OutputFile::new(stage(dest)?, expected), n: 0 };
            let context = run(&mut out).map_err(|e| esdk_error(&job.input, e))?;
            commit(out.inner, dest)?;
            (context, out.n)
        }
        (dest, target) => {
            let shown = dest.as_ref().map_or("stdout".into(), |d| d.display().to_string());
            let fail = |e: std::io::Error| CliError::new(exit::FAILURE, format!("cannot write {shown}: {e}"));
            let target = stream_output(dest.as_deref(), target).map_err(fail)?;
            let mut out = Counting { inner: BufWriter::with_capacity(1 << 20, target), n: 0 };
            let context = run(&mut out).map_err(|e| esdk_error(&job.input, e))?;
            out.flush().map_err(fail)?;
            (context, out.n)
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let (Some((f, Some(len))), "-") = (&file, job.input.as_str()) {
        // Read at offsets, stdin's file was not moved: leave it where reading it through
        // would have (a script may read on from the same descriptor).
        use std::io::Seek;
        let _ = (&*f).seek(std::io::SeekFrom::Start(*len));
    }
    Ok(Done {
        input: job.input.clone(),
        output: job.output.as_ref().map_or("-".into(), |p| p.display().to_string()),
        bytes_in: read.load(Ordering::Relaxed),
        bytes_out,
        seconds: started.elapsed().as_secs_f64(),
        context,
    })
}

/// Stdin, when it is a regular file read from its start (`custody encrypt < big.bin`), as a file
/// of its length: then it is read at offsets by every core, as a file named on the command line
/// is, instead of as a stream (0.13 s per GiB instead of 0.23 here, BENCHMARKS session 15).
/// Elsewhere in the file (a script read part of it first) it stays a stream, read from there.
fn stdin_file() -> Option<(std::fs::File, u64)> {
    use std::io::Seek;
    use std::os::fd::AsFd;
    let file = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned().ok()?);
    let meta = file.metadata().ok().filter(|m| m.is_file())?;
    ((&file).stream_position().ok()? == 0).then_some((file, meta.len()))
}

/// A regular file being read at offsets, counting what is read (and moving the progress bar).
struct CountedFile<'a> {
    inner: &'a std::fs::File,
    n: &'a AtomicU64,
    bar: Option<indicatif::ProgressBar>,
}

impl ReadAt for CountedFile<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let k = self.inner.read_at(buf, offset)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(k as u64);
        }
        Ok(k)
    }
}

/// A stream being read, counting what is read.
struct Counted<'a, R> {
    inner: R,
    n: &'a AtomicU64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn report(done: &[Done], verb: &str, verbose: bool, json: bool) {
    if json {
        let files: Vec<_> = done
            .iter()
            .map(|d| {
                json!({
                    "Input": d.input, "Output": d.output, "BytesIn": d.bytes_in, "BytesOut": d.bytes_out,
                    "Seconds": d.seconds, "EncryptionContext": d.context,
                })
            })
            .collect();
        // Only when the output is not stdout (it would mix with the data).
        if done.iter().all(|d| d.output != "-") {
            print_json(&json!({ "Files": files }));
        }
    }
    if verbose {
        for d in done {
            let mib = d.bytes_in as f64 / (1024.0 * 1024.0);
            eprintln!(
                "{verb} {} -> {}: {} bytes in {:.3} s ({:.1} MiB/s)",
                d.input,
                d.output,
                d.bytes_in,
                d.seconds,
                mib / d.seconds.max(1e-9)
            );
        }
    }
}

/// `custody encrypt`
pub async fn encrypt(conn: &ConnArgs, a: EncryptArgs, json: bool) -> Result<()> {
    let jobs = plan(&a.keys, Suffix::Add)?;
    let keyring = keyring(conn, &a.keys, Purpose::Encrypt).await?;
    let context: EncryptionContext = a.context.iter().cloned().collect();
    let options = EncryptOptions {
        suite: match a.suite {
            SuiteArg::Committed => Suite::Committed,
            SuiteArg::CommittedSigned => Suite::CommittedSigned,
        },
        frame_length: a.frame_size,
        plaintext_length: None,
    };
    let done = tokio::task::spawn_blocking(move || {
        jobs.iter()
            .map(|job| {
                run_job(job, "encrypting", false, &|source, mut w| {
                    let keyring = keyring.as_ref();
                    match source {
                        Source::File(f, len) => esdk::encrypt_at(keyring, &context, options, f, len, &mut w),
                        Source::Stream(mut r) => esdk::encrypt(keyring, &context, options, &mut r, &mut w),
                    }
                    .map(|_| Some(context.clone()))
                })
            })
            .collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|e| CliError::new(exit::FAILURE, format!("encryption stopped: {e}")))??;
    report(&done, "encrypted", a.keys.verbose, json);
    Ok(())
}

/// `custody decrypt`
pub async fn decrypt(conn: &ConnArgs, a: DecryptArgs, json: bool) -> Result<()> {
    let jobs = plan(&a.keys, Suffix::Strip)?;
    let keyring = keyring(conn, &a.keys, Purpose::Decrypt { discovery: a.discovery }).await?;
    let options = esdk::DecryptOptions {
        max_encrypted_data_keys: a.max_encrypted_data_keys,
        required_context: a.require_context.iter().cloned().collect(),
        ..Default::default()
    };
    let done = tokio::task::spawn_blocking(move || {
        jobs.iter()
            .map(|job| {
                run_job(job, "decrypting", true, &|source, mut w| {
                    let keyring = keyring.as_ref();
                    match source {
                        Source::File(f, len) => esdk::decrypt_at(keyring, &options, f, len, &mut w),
                        Source::Stream(mut r) => esdk::decrypt(keyring, &options, &mut r, &mut w),
                    }
                    .map(|info| Some(info.header.context))
                })
            })
            .collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|e| CliError::new(exit::FAILURE, format!("decryption stopped: {e}")))??;
    report(&done, "decrypted", a.keys.verbose, json);
    Ok(())
}

/// `custody rewrap`
#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// The key (id, ARN or alias) to wrap the data keys under, at its current version
    /// (repeatable: each wraps them).
    #[arg(short = 'k', long = "key", value_name = "KEY", required = true)]
    keys: Vec<String>,
    /// Only unwrap data keys of these keys (strict); default: any custody key you may use.
    #[arg(long = "from", value_name = "KEY")]
    from: Vec<String>,
    /// Raw AES keys that may unwrap the current data keys: PROVIDER/NAME=KEYFILE (repeatable).
    #[arg(long = "raw-aes-key", value_name = "PROVIDER/NAME=KEYFILE")]
    raw_aes_keys: Vec<String>,
    /// Most KMS operations per second, over all workers (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Files re-wrapped at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Only say what would be done.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Journal of finished files: those listed are skipped, each one finished is added (so an
    /// interrupted run continues where it stopped).
    #[arg(long, value_name = "JOURNAL")]
    resume: Option<PathBuf>,
    /// Print one line per file.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Files, or directories (every file under them).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Rewrapped,
    AlreadyDone,
    InJournal,
    WouldRewrap,
}

/// Spaces out KMS operations to at most `rate` per second, over all workers.
struct Pace {
    every: Option<std::time::Duration>,
    next: std::sync::Mutex<Instant>,
}

impl Pace {
    fn new(rate: f64) -> Self {
        let every = (rate > 0.0).then(|| std::time::Duration::from_secs_f64(1.0 / rate));
        Self { every, next: std::sync::Mutex::new(Instant::now()) }
    }

    fn take(&self, ops: u32) {
        let Some(every) = self.every else { return };
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let at = (*next).max(now);
            *next = at + every * ops;
            at - now
        };
        std::thread::sleep(wait);
    }
}

/// `custody rewrap`
pub async fn rewrap(conn: &ConnArgs, a: RewrapArgs, json: bool) -> Result<()> {
    let mut files = Vec::new();
    for p in &a.paths {
        if p.is_dir() {
            files.extend(walk(p)?);
        } else {
            // Rewritten in place: a regular file only (a link would be replaced by a file and
            // its target left as it was; a device or a pipe cannot be).
            let meta = std::fs::symlink_metadata(p)
                .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read {}: {e}", p.display())))?;
            if !meta.is_file() {
                let what = if meta.is_symlink() {
                    "a symbolic link: give the file it points to"
                } else {
                    "not a regular file"
                };
                return Err(CliError::new(exit::USAGE, format!("{} is {what}", p.display())));
            }
            files.push(p.clone());
        }
    }
    let journal: std::collections::HashSet<String> = match &a.resume {
        Some(j) if j.exists() => std::fs::read_to_string(j)
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read the journal {}: {e}", j.display())))?
            .lines()
            .map(str::to_string)
            .collect(),
        _ => Default::default(),
    };
    // The target keys: their ARNs, and the key id and version a fresh wrapping carries (a data key
    // wrapped by that version is already done).
    let mut client = connect(conn).await?;
    let mut targets = Vec::new();
    for key in &a.keys {
        let r = client.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": B64.encode([0u8]) })).await?;
        let arn = r["KeyId"].as_str().unwrap_or_default().to_string();
        let blob = B64.decode(r["CiphertextBlob"].as_str().unwrap_or_default()).unwrap_or_default();
        targets.push((arn, BlobHeader::parse(&blob).ok()));
    }
    let from = if a.from.is_empty() {
        Discovery::Any { arn_prefixes: Vec::new() }
    } else {
        let mut arns = Vec::new();
        for key in &a.from {
            arns.push(KmsKeyring::resolve_arn(&mut client, key).await?);
        }
        Discovery::Strict(arns)
    };
    let workers = usize::from(a.concurrency).min(files.len().max(1));
    let mut rings = Vec::new();
    for _ in 0..workers {
        let client = connect(conn).await?;
        let kms = KmsKeyring::new(client, tokio::runtime::Handle::current(), a.keys.clone(), from.clone());
        let mut old: Vec<Box<dyn Keyring>> = Vec::new();
        for spec in &a.raw_aes_keys {
            old.push(Box::new(raw_keyring(spec)?));
        }
        rings.push((kms, old));
    }
    let queue = std::sync::Mutex::new(files.into_iter().collect::<std::collections::VecDeque<_>>());
    let pace = Pace::new(a.rate);
    let journal_file =
        match &a.resume {
            Some(j) if !a.dry_run => {
                Some(std::sync::Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(j).map_err(
                    |e| CliError::new(exit::FAILURE, format!("cannot open the journal {}: {e}", j.display())),
                )?))
            }
            _ => None,
        };
    let ops = 1 + a.keys.len() as u32;
    let (dry_run, verbose) = (a.dry_run, a.verbose);
    let started = Instant::now();
    let results = tokio::task::spawn_blocking(move || {
        let results = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for (kms, raw) in &rings {
                let (queue, pace, journal, journal_file, targets, results) =
                    (&queue, &pace, &journal, &journal_file, &targets, &results);
                s.spawn(move || loop {
                    let Some(path) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { return };
                    let shown = path.display().to_string();
                    let fate = rewrap_one(&path, &shown, kms, raw, targets, journal, dry_run, pace, ops);
                    if let (Ok(Fate::Rewrapped), Some(j)) = (&fate, journal_file) {
                        let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = writeln!(j, "{shown}");
                    }
                    if verbose {
                        match &fate {
                            Ok(f) => eprintln!("{shown}: {f:?}"),
                            Err(e) => eprintln!("{shown}: FAILED: {}", e.message),
                        }
                    }
                    results.lock().unwrap_or_else(|p| p.into_inner()).push((shown, fate));
                });
            }
        });
        results.into_inner().unwrap_or_else(|p| p.into_inner())
    })
    .await
    .map_err(|e| CliError::new(exit::FAILURE, format!("rewrap stopped: {e}")))?;
    let count = |f: Fate| results.iter().filter(|(_, r)| matches!(r, Ok(x) if *x == f)).count();
    let failed: Vec<&(String, Result<Fate>)> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let summary = json!({
        "Rewrapped": count(Fate::Rewrapped),
        "WouldRewrap": count(Fate::WouldRewrap),
        "AlreadyDone": count(Fate::AlreadyDone),
        "InJournal": count(Fate::InJournal),
        "Failed": failed.iter().map(|(p, r)| json!({ "Path": p, "Error": r.as_ref().err().map(|e| e.message.clone()) })).collect::<Vec<_>>(),
        "Seconds": started.elapsed().as_secs_f64(),
    });
    if json {
        print_json(&summary);
    } else {
        println!(
            "{} re-wrapped, {} already under the key's current version, {} skipped (journal){}, {} failed, in {:.1} s",
            summary["Rewrapped"],
            summary["AlreadyDone"],
            summary["InJournal"],
            if dry_run { format!(", {} would be re-wrapped", summary["WouldRewrap"]) } else { String::new() },
            failed.len(),
            started.elapsed().as_secs_f64()
        );
        for (p, r) in &failed {
            eprintln!("{p}: {}", r.as_ref().err().map(|e| e.message.as_str()).unwrap_or(""));
        }
    }
    match failed.first() {
        None => Ok(()),
        Some((_, Err(e))) => Err(CliError::new(e.code, format!("{} file(s) could not be re-wrapped", failed.len()))),
        Some(_) => unreachable!("failed holds errors only"),
    }
}

/// Re-wraps one file in place (atomically), unless it is done already.
#[allow(clippy::too_many_arguments)]
fn rewrap_one(
    path: &Path,
    shown: &str,
    kms: &KmsKeyring,
    raw: &[Box<dyn Keyring>],
    targets: &[(String, Option<BlobHeader>)],
    journal: &std::collections::HashSet<String>,
    dry_run: bool,
    pace: &Pace,
    ops: u32,
) -> Result<Fate> {
    if journal.contains(shown) {
        return Ok(Fate::InJournal);
    }
    let fail = |e: std::io::Error| CliError::new(exit::FAILURE, format!("{shown}: {e}"));
    let file = std::fs::File::open(path).map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    let permissions = meta.permissions();
    let mut input = BufReader::with_capacity(1 << 20, file);
    let header = esdk::read_header(&mut input, &esdk::DecryptOptions::default()).map_err(|e| esdk_error(shown, e))?;
    let done = targets.iter().all(|(arn, current)| {
        header.encrypted_data_keys.iter().any(|k| {
            k.provider_id == custody_client::keyring::KMS_PROVIDER_ID
                && k.provider_info == arn.as_bytes()
                && current.is_some()
                && BlobHeader::parse(&k.ciphertext).ok() == *current
        })
    });
    if done {
        return Ok(Fate::AlreadyDone);
    }
    if dry_run {
        return Ok(Fate::WouldRewrap);
    }
    pace.take(ops);
    let staged = stage(path)?;
    staged.as_file().set_permissions(permissions).map_err(fail)?;
    let mut out = OutputFile::new(staged, Some(meta.len()));
    // Old data keys: the KMS keyring (discovery or --from), then raw keys.
    let old_rings: Vec<&dyn Keyring> =
        std::iter::once(kms as &dyn Keyring).chain(raw.iter().map(|r| r.as_ref())).collect();
    let old = AnyOf(old_rings);
    esdk::rewrap(&header, &old, kms, &mut input, &mut out).map_err(|e| esdk_error(shown, e))?;
    commit(out, path)?;
    Ok(Fate::Rewrapped)
}

/// Borrowed keyrings tried in turn on decryption (encryption goes elsewhere).
struct AnyOf<'a>(Vec<&'a dyn Keyring>);

impl Keyring for AnyOf<'_> {
    fn on_encrypt(&self, _: &mut esdk::EncryptionMaterials) -> std::result::Result<(), EsdkError> {
        Err(EsdkError::Invalid("this keyring only decrypts".into()))
    }

    fn on_decrypt(
        &self,
        suite: Suite,
        context: &EncryptionContext,
        keys: &[esdk::EncryptedDataKey],
    ) -> std::result::Result<Option<esdk::DataKey>, EsdkError> {
        esdk::first_data_key(self.0.iter().copied(), suite, context, keys)
    }
}
