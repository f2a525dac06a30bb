//! JSON documents that carry secrets in their strings (a plaintext, a data key, a private key):
//! serialized without leaving a copy behind, and wiped when dropped.
//!
//! The server answers with them and the client sends them; both would otherwise leave base64
//! secrets in freed memory: a `String` dropped unwiped, a `Vec` reallocated as it grows (the old
//! buffer freed with what was written so far), a body freed after it was sent.

use bytes::Bytes;
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

/// A JSON value whose strings are zeroized when it is dropped.
pub struct SecretJson(Value);

impl SecretJson {
    /// Wraps a value; its strings are wiped when it is dropped. Build it by moving secrets in
    /// (`v["Plaintext"] = Value::String(text)`): `serde_json::json!` clones an expression's string
    /// and drops the original unwiped.
    pub fn new(value: Value) -> Self {
        Self(value)
    }

    /// The value.
    pub fn value(&self) -> &Value {
        &self.0
    }

    /// The value serialized once, into a buffer that wipes what it leaves behind when it grows,
    /// and zeroized when the returned bytes are dropped. Given to hyper as a body over TLS, no
    /// other copy is made: hyper queues the bytes for a stream that writes vectored, and rustls
    /// encrypts in place.
    pub fn into_bytes(self) -> Bytes {
        let mut out = WipingBuf(Zeroizing::new(Vec::with_capacity(512)));
        serde_json::to_writer(&mut out, &self.0).expect("JSON values serialize");
        Bytes::from_owner(WipedOnDrop(out.0))
    }
}

impl Drop for SecretJson {
    fn drop(&mut self) {
        wipe_strings(&mut self.0);
    }
}

impl std::fmt::Debug for SecretJson {
    /// Never the value: it holds secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretJson(..)")
    }
}

/// Zeroizes every string in `v` (object keys are field names, not secrets).
pub fn wipe_strings(v: &mut Value) {
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe_strings),
        Value::Object(fields) => fields.values_mut().for_each(wipe_strings),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// A buffer that never leaves a copy of its bytes in freed memory: to grow, it moves them into a
/// larger buffer and zeroizes the old one (a `Vec` would free it as it was).
struct WipingBuf(Zeroizing<Vec<u8>>);

impl std::io::Write for WipingBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let needed = self.0.len() + buf.len();
        if needed > self.0.capacity() {
            let mut grown = Zeroizing::new(Vec::with_capacity(needed.max(2 * self.0.capacity())));
            grown.extend_from_slice(&self.0);
            // The old buffer is zeroized as it is dropped here.
            self.0 = grown;
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serialized bytes, zeroized when their last user drops them.
struct WipedOnDrop(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for WipedOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serializes_as_serde_json_does_and_wipes_every_string() {
        let v = json!({ "KeyId": "k", "Plaintext": "c2VjcmV0", "List": ["a", { "b": "c" }], "N": 3, "T": true });
        let expected = serde_json::to_vec(&v).unwrap();
        assert_eq!(SecretJson::new(v.clone()).into_bytes().as_ref(), expected.as_slice());

        let mut w = v;
        wipe_strings(&mut w);
        assert_eq!(w, json!({ "KeyId": "", "Plaintext": "", "List": ["", { "b": "" }], "N": 3, "T": true }));
    }

    #[test]
    fn debug_shows_no_value() {
        assert_eq!(format!("{:?}", SecretJson::new(json!({ "Plaintext": "c2VjcmV0" }))), "SecretJson(..)");
    }
}
