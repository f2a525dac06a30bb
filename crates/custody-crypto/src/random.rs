//! The one source of randomness: the operating system's CSPRNG through AWS-LC.

use std::convert::Infallible;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

use crate::secret::SecretBytes;

/// Fills `out` with random bytes.
///
/// # Panics
/// If the system random number generator fails. There is no safe way to continue without one,
/// and AWS-LC itself aborts in that case.
pub fn fill(out: &mut [u8]) {
    SystemRandom::new().fill(out).expect("the system random number generator failed");
}

/// `N` random bytes (not secret: salts, nonces, identifiers).
pub fn array<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    fill(&mut out);
    out
}

/// `len` random secret bytes (data keys, GenerateRandom).
pub fn secret(len: usize) -> SecretBytes {
    let mut bytes = vec![0u8; len];
    fill(&mut bytes);
    SecretBytes::new(bytes)
}

/// Adapter so that crates built on `rand_core` draw from the same system generator.
#[derive(Debug, Default)]
pub(crate) struct SystemRng;

impl rand_core::TryRng for SystemRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(u32::from_le_bytes(array()))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(u64::from_le_bytes(array()))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        fill(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for SystemRng {}
