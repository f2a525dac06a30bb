//! custody wipes the secrets of an answer or a request when it is done with them: a plaintext, a
//! data key or an unseal share is not left behind in freed memory for a heap-reading bug (or a
//! core file, were one ever written) to find.
//!
//! The test reads its own process's memory (`/proc/self/mem`) for each secret after the code
//! under test dropped it. So that the search itself cannot be what finds a secret, the test keeps
//! only a masked excerpt of each one. A control first shows the search works: an ordinary
//! serialization, dropped, leaves its secret where the search finds it. It is the only test in
//! this binary, so no other test's allocations reuse freed blocks between a drop and a search.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use custody_server::protocol::{Answer, Fields};
use serde_json::{json, Value};
use zeroize::Zeroize;

/// The secrets' masked excerpts are XORed with this; memory is unmasked as it is compared.
const MASK: u8 = 0x5a;

/// A random secret as base64 text (what answers and requests carry), and a masked excerpt of it
/// from the middle (allocators write their own pointers at the start of a freed block).
struct Secret {
    excerpt: [u8; 48],
}

impl Secret {
    /// Returns the secret's base64 (256 random bytes: 344 characters, well within the sizes a
    /// freed block is kept for reuse, not returned to the system) and its masked excerpt.
    fn new() -> (String, Self) {
        let text = B64.encode(custody_crypto::random::array::<256>());
        let mut excerpt = [0u8; 48];
        for (e, b) in excerpt.iter_mut().zip(&text.as_bytes()[150..198]) {
            *e = b ^ MASK;
        }
        (text, Self { excerpt })
    }

    fn is_in(&self, haystack: &[u8]) -> bool {
        haystack.windows(self.excerpt.len()).any(|w| w.iter().zip(&self.excerpt).all(|(a, e)| a ^ MASK == *e))
    }

    /// Appends the secret's text to `out` (which must have room: no reallocation may copy it).
    fn text_into(text: String, out: &mut Vec<u8>) {
        assert!(out.capacity() - out.len() >= text.len(), "room reserved");
        out.extend_from_slice(text.as_bytes());
        let mut text = text;
        text.zeroize();
    }
}

/// Searches the process's writable memory. Its buffers are made before any secret exists and
/// reused, so that searching allocates nothing a freed secret's block could be handed out for.
struct Memory {
    maps: String,
    chunk: Vec<u8>,
    mem: File,
}

impl Memory {
    fn new() -> Self {
        Self {
            maps: String::with_capacity(4 << 20),
            chunk: vec![0; 1 << 20],
            mem: File::open("/proc/self/mem").expect("a process can read its own memory"),
        }
    }

    fn holds(&mut self, secret: &Secret) -> bool {
        self.maps.clear();
        let capacity = self.maps.capacity();
        File::open("/proc/self/maps").and_then(|mut f| f.read_to_string(&mut self.maps)).expect("maps readable");
        assert_eq!(self.maps.capacity(), capacity, "the map listing fit its buffer");
        let overlap = secret.excerpt.len() - 1;
        let mut found = false;
        for line in self.maps.lines() {
            let mut fields = line.split_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
            if !perms.starts_with("rw") {
                continue;
            }
            let (start, end) = range.split_once('-').expect("start-end");
            let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
            let mut at = start;
            while at < end {
                let want = (end - at).min(self.chunk.len() as u64) as usize;
                let Ok(n) = self.mem.read_at(&mut self.chunk[..want], at) else { break };
                if n == 0 {
                    break;
                }
                found |= secret.is_in(&self.chunk[..n]);
                if at + (n as u64) >= end {
                    break;
                }
                at += (n - overlap.min(n - 1)) as u64;
            }
        }
        // The last chunk read may hold the secret: wipe it so the next search starts clean.
        self.chunk.zeroize();
        self.chunk.resize(1 << 20, 0);
        found
    }
}

fn decrypt_answer(plaintext: String) -> Value {
    let mut v =
        json!({ "KeyId": "arn:aws:kms:us-east-1:111122223333:key/x", "EncryptionAlgorithm": "SYMMETRIC_DEFAULT" });
    v["Plaintext"] = Value::String(plaintext);
    v
}

/// A request body as a client sends it, built in place so that no reallocation copies it.
fn encrypt_request(plaintext: String) -> Vec<u8> {
    let mut body = Vec::with_capacity(1024);
    body.extend_from_slice(br#"{"KeyId":"alias/app","Plaintext":""#);
    Secret::text_into(plaintext, &mut body);
    body.extend_from_slice(br#""}"#);
    body
}

#[cfg(target_os = "linux")]
#[test]
fn secrets_of_answers_and_requests_are_wiped_when_dropped() {
    let mut memory = Memory::new();

    // The control: a body serialized the ordinary way and dropped stays in freed memory.
    let (text, control) = Secret::new();
    let body = serde_json::to_vec(&decrypt_answer(text)).unwrap();
    assert!(control.is_in(&body));
    drop(body);
    assert!(memory.holds(&control), "the search finds a secret that an ordinary serialization left in freed memory");

    // An answer sent: serialized into memory wiped when the sent body is dropped.
    let (text, sent) = Secret::new();
    let bytes = Answer::new(decrypt_answer(text)).into_bytes();
    assert!(sent.is_in(&bytes), "the body carries the secret");
    let response = hyper::Response::new(http_body_util::Full::new(bytes));
    drop(response);
    assert!(!memory.holds(&sent), "an answer's secret is left in freed memory after it was sent");

    // An answer whose buffer grows after the secret is in it (a long field serializes after
    // `Plaintext`): the buffer it outgrew is wiped, not freed as it was.
    let (text, grown) = Secret::new();
    let mut v = decrypt_answer(text);
    v["Zz"] = Value::String("z".repeat(4000));
    let bytes = Answer::new(v).into_bytes();
    assert!(grown.is_in(&bytes));
    drop(bytes);
    assert!(!memory.holds(&grown), "an answer's secret is left in the buffer it outgrew");

    // An answer never sent (its audit record failed: 503 instead).
    let (text, unsent) = Secret::new();
    drop(Answer::new(decrypt_answer(text)));
    assert!(!memory.holds(&unsent), "an unsent answer's secret is left in freed memory");

    // The control for requests: the same body parsed the ordinary way, dropped.
    let (text, control) = Secret::new();
    let mut body = encrypt_request(text);
    let parsed: Value = serde_json::from_slice(&body).unwrap();
    body.zeroize();
    drop(parsed);
    assert!(memory.holds(&control), "the search finds a secret that an ordinary parse left in freed memory");

    // A request's fields: its strings are wiped when the request is done.
    let (text, received) = Secret::new();
    let mut body = encrypt_request(text);
    let fields = Fields::parse(&body).unwrap();
    body.zeroize();
    assert!(memory.holds(&received), "the parsed request holds the secret until it is dropped");
    drop(fields);
    assert!(!memory.holds(&received), "a request's secret is left in freed memory after it was parsed");
}
