//! Shamir secret sharing of the root key (DESIGN.md §5, seal method `shamir`).
//!
//! Arithmetic is vsss-rs's constant-time GF(2^8) (no log/exp tables, whose memory access pattern
//! depends on the secret). A share's text form is `custody-share-` followed by base64url of
//!
//! ```text
//! format (1 byte, 0x01) || threshold (1) || x (1, nonzero) || y (32)
//! ```
//!
//! The store keeps a fingerprint of each share it issued, so a mistyped share or one from another
//! store is refused on submission rather than after the threshold is reached.

use std::fmt;

use aws_lc_rs::digest;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use vsss_rs::{Gf256, IdentifierGf256};
use zeroize::Zeroizing;

use crate::keys::RootKey;
use crate::random::SystemRng;
use crate::secret::SecretBytes;

/// Text prefix of every share.
pub const SHARE_PREFIX: &str = "custody-share-";
const FORMAT_V1: u8 = 0x01;
const SHARE_LEN: usize = 3 + RootKey::LEN;
const FINGERPRINT_LABEL: &[u8] = b"custody/v1/share-fingerprint";

/// One Shamir share of the root key.
pub struct UnsealShare(SecretBytes);

/// Why shares could not be made or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShamirError {
    /// Threshold and share count out of range.
    #[error("need 1 <= threshold <= shares <= 255 and threshold >= 2 when shares >= 2 (got threshold {threshold}, shares {shares})")]
    BadParameters {
        /// requested threshold
        threshold: usize,
        /// requested share count
        shares: usize,
    },
    /// The text is not a custody share.
    #[error("this is not a custody unseal share (expected text starting with {SHARE_PREFIX})")]
    Malformed,
    /// Shares disagree on the threshold, repeat an index, or are too few.
    #[error("the shares do not belong together or are too few")]
    Inconsistent,
}

impl UnsealShare {
    /// Parses the text form (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, ShamirError> {
        let body = text.trim().strip_prefix(SHARE_PREFIX).ok_or(ShamirError::Malformed)?;
        if body.len() > 4 * SHARE_LEN {
            return Err(ShamirError::Malformed);
        }
        let bytes = Zeroizing::new(URL_SAFE_NO_PAD.decode(body).map_err(|_| ShamirError::Malformed)?);
        if bytes.len() != SHARE_LEN || bytes[0] != FORMAT_V1 || bytes[1] == 0 || bytes[2] == 0 {
            return Err(ShamirError::Malformed);
        }
        Ok(Self(SecretBytes::copy_from(&bytes)))
    }

    /// The text form, to print once or write to a share file.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::from(SHARE_PREFIX));
        URL_SAFE_NO_PAD.encode_string(self.0.expose_secret(), &mut s);
        s
    }

    /// How many shares recombine the root key.
    pub fn threshold(&self) -> u8 {
        self.0.expose_secret()[1]
    }

    /// This share's index (1-based, not secret).
    pub fn index(&self) -> u8 {
        self.0.expose_secret()[2]
    }

    /// A public fingerprint the store keeps to recognise its own shares.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(FINGERPRINT_LABEL);
        ctx.update(self.0.expose_secret());
        ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
    }
}

impl fmt::Debug for UnsealShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsealShare").field("index", &self.index()).finish_non_exhaustive()
    }
}

/// Splits `root` into `shares` shares of which any `threshold` recombine it.
pub fn split(root: &RootKey, threshold: usize, shares: usize) -> Result<Vec<UnsealShare>, ShamirError> {
    let bad = ShamirError::BadParameters { threshold, shares };
    if threshold == 0 || threshold > shares || shares > 255 || (shares > 1 && threshold < 2) {
        return Err(bad);
    }
    let ids = (1..=shares).map(|i| IdentifierGf256(Gf256(i as u8)));
    let raw = if threshold == 1 {
        // One share of one: the share is the secret itself at x = 1 (vsss-rs needs threshold >= 2).
        vec![[&[1u8][..], root.expose_secret()].concat()]
    } else {
        Gf256::split_bytes_with_participant_ids_iter(threshold, shares, root.expose_secret(), SystemRng, ids)
            .map_err(|_| bad)?
    };
    Ok(raw
        .into_iter()
        .map(|share| {
            let share = Zeroizing::new(share);
            let mut bytes = Vec::with_capacity(SHARE_LEN);
            bytes.push(FORMAT_V1);
            bytes.push(threshold as u8);
            bytes.extend_from_slice(&share);
            UnsealShare(SecretBytes::new(bytes))
        })
        .collect())
}

/// Recombines the root key from at least `threshold` distinct shares.
///
/// Any `threshold` shares give *a* 32-byte value; whether it is the root key is for the caller to
/// check (against the stored [`crate::keys::RootKeyCheck`]).
pub fn combine(shares: &[UnsealShare]) -> Result<RootKey, ShamirError> {
    let threshold = shares.first().ok_or(ShamirError::Inconsistent)?.threshold();
    if shares.iter().any(|s| s.threshold() != threshold) || shares.len() < usize::from(threshold) {
        return Err(ShamirError::Inconsistent);
    }
    let mut seen = [false; 256];
    for s in shares {
        if std::mem::replace(&mut seen[usize::from(s.index())], true) {
            return Err(ShamirError::Inconsistent);
        }
    }
    let used = &shares[..usize::from(threshold)];
    let secret = if threshold == 1 {
        Zeroizing::new(used[0].0.expose_secret()[3..].to_vec())
    } else {
        let raw: Vec<Vec<u8>> = used.iter().map(|s| s.0.expose_secret()[2..].to_vec()).collect();
        let raw = Zeroizing::new(raw);
        Zeroizing::new(Gf256::combine_bytes(&*raw).map_err(|_| ShamirError::Inconsistent)?)
    };
    RootKey::from_bytes(&secret).ok_or(ShamirError::Inconsistent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_three_of_five_recombine() {
        let root = RootKey::generate();
        let shares = split(&root, 3, 5).unwrap();
        let texts: Vec<_> = shares.iter().map(|s| s.to_text()).collect();
        for combo in [[0, 1, 2], [0, 2, 4], [4, 3, 1], [1, 2, 3]] {
            let picked: Vec<_> = combo.iter().map(|&i| UnsealShare::parse(&texts[i]).unwrap()).collect();
            let back = combine(&picked).unwrap();
            assert_eq!(back.expose_secret(), root.expose_secret());
        }
    }

    #[test]
    fn fewer_than_threshold_or_repeated_shares_are_refused() {
        let root = RootKey::generate();
        let shares = split(&root, 3, 5).unwrap();
        let two: Vec<_> = shares.iter().take(2).map(|s| UnsealShare::parse(&s.to_text()).unwrap()).collect();
        assert_eq!(combine(&two).unwrap_err(), ShamirError::Inconsistent);
        let repeated: Vec<_> = [0, 0, 1].iter().map(|&i| UnsealShare::parse(&shares[i].to_text()).unwrap()).collect();
        assert_eq!(combine(&repeated).unwrap_err(), ShamirError::Inconsistent);
    }

    #[test]
    fn a_wrong_share_gives_a_different_key() {
        let root = RootKey::generate();
        let shares = split(&root, 2, 3).unwrap();
        let mut text = shares[1].to_text().to_string();
        // Change one character inside y (the characters before the last encode whole y bytes).
        let at = text.len() - 5;
        let c = if &text[at..at + 1] == "A" { "B" } else { "A" };
        text.replace_range(at..at + 1, c);
        let wrong = UnsealShare::parse(&text).unwrap();
        let got = combine(&[UnsealShare::parse(&shares[0].to_text()).unwrap(), wrong]).unwrap();
        assert!(!root.check_value().matches(&got));
        assert_ne!(shares[1].fingerprint(), UnsealShare::parse(&text).unwrap().fingerprint());
    }

    #[test]
    fn parameters_and_text_are_validated() {
        let root = RootKey::generate();
        assert!(split(&root, 0, 5).is_err());
        assert!(split(&root, 6, 5).is_err());
        assert!(split(&root, 1, 3).is_err(), "1-of-n would hand the root key to each holder");
        assert!(split(&root, 2, 256).is_err());
        let one = split(&root, 1, 1).unwrap();
        assert_eq!(combine(&one).unwrap().expose_secret(), root.expose_secret());
        assert_eq!(UnsealShare::parse("hello").unwrap_err(), ShamirError::Malformed);
        assert_eq!(UnsealShare::parse("custody-share-!!!").unwrap_err(), ShamirError::Malformed);
        assert_eq!(UnsealShare::parse("custody-share-AAAA").unwrap_err(), ShamirError::Malformed);
    }

    #[test]
    fn debug_does_not_print_the_share() {
        let root = RootKey::generate();
        let share = &split(&root, 2, 2).unwrap()[0];
        let printed = format!("{share:?}");
        assert!(!printed.contains(&share.to_text()[SHARE_PREFIX.len()..]));
    }
}
