//! Properties of the parsers and formats that read untrusted bytes: they never panic, and what
//! is made can be read back — but not after any change.

use std::collections::BTreeMap;

use custody_crypto::blob::{self, BlobHeader};
use custody_crypto::shamir::{self, UnsealShare};
use custody_crypto::{EncryptionContext, KeyMaterial, RootKey};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn blob_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let m = KeyMaterial::generate(32);
        let _ = BlobHeader::parse(&bytes);
        prop_assert!(blob::decrypt(&m, &bytes, &EncryptionContext::empty()).is_err());
    }

    #[test]
    fn blobs_round_trip_and_any_single_change_fails(
        plaintext in proptest::collection::vec(any::<u8>(), 0..300),
        ctx in proptest::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..4),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let m = KeyMaterial::generate(32);
        let ctx = EncryptionContext::new(ctx).unwrap();
        let b = blob::encrypt(&m, BlobHeader { key_id: [3; 16], version: 7 }, &ctx, &plaintext);
        let back = blob::decrypt(&m, &b, &ctx).unwrap();
        prop_assert_eq!(back.expose_secret(), plaintext.as_slice());
        let mut t = b.clone();
        let i = flip.index(t.len());
        t[i] ^= 1 << bit;
        prop_assert!(blob::decrypt(&m, &t, &ctx).is_err());
    }

    #[test]
    fn share_parsing_never_panics(text in ".{0,120}") {
        let _ = UnsealShare::parse(&text);
        let _ = UnsealShare::parse(&format!("{}{text}", shamir::SHARE_PREFIX));
    }

    #[test]
    fn any_threshold_subset_recombines(threshold in 2usize..6, extra in 0usize..4, pick in any::<u64>()) {
        let shares_n = threshold + extra;
        let root = RootKey::generate();
        let shares = shamir::split(&root, threshold, shares_n).unwrap();
        // A pseudo-random subset of exactly `threshold` shares.
        let mut idx: Vec<usize> = (0..shares_n).collect();
        let mut p = pick;
        for i in (1..idx.len()).rev() {
            idx.swap(i, (p % (i as u64 + 1)) as usize);
            p = p.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15;
        }
        let subset: Vec<UnsealShare> =
            idx[..threshold].iter().map(|&i| UnsealShare::parse(&shares[i].to_text()).unwrap()).collect();
        let back = shamir::combine(&subset).unwrap();
        prop_assert_eq!(back.expose_secret(), root.expose_secret());
    }

    #[test]
    fn context_validation_never_panics(pairs in proptest::collection::btree_map(".{0,40}", ".{0,200}", 0..80)) {
        let pairs: BTreeMap<String, String> = pairs;
        if let Ok(c) = EncryptionContext::new(pairs) {
            prop_assert!(c.canonical_bytes().len() <= custody_crypto::context::MAX_SERIALIZED_LEN);
        }
    }
}
