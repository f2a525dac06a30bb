//! The server's parsers of untrusted input never panic: SigV4 Authorization headers and request
//! bodies.

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn authorization_headers(h in ".{0,300}") {
        let _ = custody_server::sigv4::parse_authorization(&h);
        let _ = custody_server::sigv4::parse_authorization(&format!("AWS4-HMAC-SHA256 {h}"));
    }

    #[test]
    fn request_bodies(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(fields) = custody_server::protocol::Fields::parse(&body) {
            let _ = fields.audit_hints("TrentService.Decrypt");
            let _ = fields.audit_hints("TrentService.ReEncrypt");
        }
    }

    #[test]
    fn json_shaped_bodies(key in "(KeyId|SourceKeyId|DestinationKeyId|CiphertextBlob|EncryptionContext|SourceEncryptionContext|Plaintext|Limit)", value in ".{0,60}") {
        let body = format!("{{\"{key}\": {value}}}");
        if let Ok(fields) = custody_server::protocol::Fields::parse(body.as_bytes()) {
            let _ = fields.audit_hints("TrentService.Encrypt");
            let _ = fields.audit_hints("TrentService.ReEncrypt");
        }
    }
}
