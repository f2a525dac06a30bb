//! Verifying AWS Signature Version 4 (header authentication) on incoming requests.
//!
//! The canonical request is rebuilt from what arrived (method, path, query, the headers the
//! client says it signed, the SHA-256 of the body), exactly as AWS defines it; the signature
//! check itself is in `custody_crypto::sigv4`. Presigned query-string authentication is not
//! supported.

use custody_crypto::sigv4;
use custody_kms::{Caller, Kms, SigV4Scope};
use hyper::HeaderMap;
use time::{Duration, OffsetDateTime, PrimitiveDateTime};

use crate::protocol::ApiError;

/// How far a request's timestamp may be from the server's clock.
pub const MAX_SKEW: Duration = Duration::minutes(15);
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const SERVICE: &str = "kms";

/// What the signature covers.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Raw path, as sent.
    pub path: &'a str,
    /// Raw query string, as sent (without `?`).
    pub query: &'a str,
    /// All headers.
    pub headers: &'a HeaderMap,
    /// The body.
    pub body: &'a [u8],
}

/// A parsed `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// Access key id.
    pub access_key_id: String,
    /// Scope date, `YYYYMMDD`.
    pub date: String,
    /// Scope region.
    pub region: String,
    /// Scope service.
    pub service: String,
    /// Signed header names, lowercase, in the client's order.
    pub signed_headers: Vec<String>,
    /// The signature, decoded from hex.
    pub signature: Vec<u8>,
}

fn incomplete(msg: impl Into<String>) -> ApiError {
    ApiError::new(400, "IncompleteSignatureException", msg)
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(400, "InvalidSignatureException", msg)
}

/// Parses the Authorization header value.
pub fn parse_authorization(value: &str) -> Result<Authorization, ApiError> {
    if value.len() > 4096 {
        return Err(incomplete("the Authorization header is too long"));
    }
    let (algorithm, rest) =
        value.trim().split_once(' ').ok_or_else(|| incomplete("the Authorization header is malformed"))?;
    if algorithm != ALGORITHM {
        return Err(incomplete(format!("unsupported authorization algorithm {algorithm:?}; use {ALGORITHM}")));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => return Err(incomplete(format!("unexpected element {:?} in the Authorization header", part.trim()))),
        }
    }
    let missing = |what: &str| incomplete(format!("Authorization header requires '{what}' parameter."));
    let credential = credential.ok_or_else(|| missing("Credential"))?;
    let signed = signed.ok_or_else(|| missing("SignedHeaders"))?;
    let signature = signature.ok_or_else(|| missing("Signature"))?;
    let parts: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = parts[..] else {
        return Err(incomplete("Credential must be <access key id>/<date>/<region>/<service>/aws4_request"));
    };
    if terminator != "aws4_request" || date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(incomplete("Credential must be <access key id>/<YYYYMMDD>/<region>/<service>/aws4_request"));
    }
    let signed_headers: Vec<String> = signed.split(';').map(str::to_string).collect();
    if signed_headers.iter().any(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase())) {
        return Err(incomplete("SignedHeaders must be lowercase header names separated by ';'"));
    }
    let signature = hex::decode(signature).map_err(|_| incomplete("Signature must be 64 hexadecimal characters"))?;
    if signature.len() != 32 {
        return Err(incomplete("Signature must be 64 hexadecimal characters"));
    }
    Ok(Authorization {
        access_key_id: access_key_id.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers,
        signature,
    })
}

/// Authenticates a SigV4-signed request: returns the caller and the access key id.
///
/// The access key id of a failed attempt is returned in the error path through `failed_key`, so
/// the audit record can name the credential that was tried.
pub fn authenticate(
    kms: &Kms,
    req: &RequestParts<'_>,
    header: &str,
    now: OffsetDateTime,
    failed_key: &mut Option<String>,
) -> Result<Caller, ApiError> {
    let auth = parse_authorization(header)?;
    *failed_key = Some(crate::protocol::first_chars(&auth.access_key_id, 128));
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(incomplete("the host header must be signed"));
    }
    let amz_date = header_value(req.headers, "x-amz-date")
        .ok_or_else(|| incomplete("Authorization header requires existence of a 'X-Amz-Date' header."))?;
    if !auth.signed_headers.iter().any(|h| h == "x-amz-date") {
        return Err(incomplete("the x-amz-date header must be signed"));
    }
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let when = PrimitiveDateTime::parse(&amz_date, &format)
        .map_err(|_| incomplete(format!("X-Amz-Date {amz_date:?} is not of the form YYYYMMDDTHHMMSSZ")))?
        .assume_utc();
    if !amz_date.starts_with(&auth.date) {
        return Err(invalid("the credential scope date does not match X-Amz-Date"));
    }
    if (now - when).abs() > MAX_SKEW {
        let fmt = |t: OffsetDateTime| t.format(&format).unwrap_or_default();
        return Err(invalid(format!(
            "Signature expired: {amz_date} is now earlier than {} ({} - 15 min.) or later than {} ({} + 15 min.)",
            fmt(now - MAX_SKEW),
            fmt(now),
            fmt(now + MAX_SKEW),
            fmt(now)
        )));
    }
    if auth.service != SERVICE {
        return Err(invalid(format!("Credential should be scoped to correct service: '{SERVICE}'.")));
    }
    if auth.region != kms.config().region {
        return Err(invalid(format!("Credential should be scoped to a valid region, not '{}'.", auth.region)));
    }
    let canonical = canonical_request(req, &auth.signed_headers)
        .ok_or_else(|| invalid("a signed header is missing from the request"))?;
    let scope = format!("{}/{}/{}/aws4_request", auth.date, auth.region, auth.service);
    let string_to_sign = format!("{ALGORITHM}\n{amz_date}\n{scope}\n{}", sigv4::sha256_hex(canonical.as_bytes()));
    let scope = SigV4Scope { date: &auth.date, region: &auth.region, service: &auth.service };
    kms.verify_access_key_signature(&auth.access_key_id, scope, string_to_sign.as_bytes(), &auth.signature)?.ok_or_else(
        || {
            invalid(
                "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
            )
        },
    )
}

/// The canonical request (AWS SigV4 "Create a canonical request"). `None` if a signed header is
/// absent.
pub fn canonical_request(req: &RequestParts<'_>, signed_headers: &[String]) -> Option<String> {
    let mut out = String::with_capacity(512);
    out.push_str(req.method);
    out.push('\n');
    out.push_str(&canonical_uri(req.path));
    out.push('\n');
    out.push_str(&canonical_query(req.query));
    out.push('\n');
    for name in signed_headers {
        out.push_str(name);
        out.push(':');
        if !push_header_value(&mut out, req.headers, name) {
            return None;
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(&sigv4::sha256_hex(req.body));
    Some(out)
}

/// All values of a header, trimmed, inner runs of spaces collapsed, joined with commas.
fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut out = String::new();
    push_header_value(&mut out, headers, name).then_some(out)
}

/// Appends [`header_value`] to `out` (no allocation of its own); false if there is no such header.
fn push_header_value(out: &mut String, headers: &HeaderMap, name: &str) -> bool {
    let mut found = false;
    for value in headers.get_all(name) {
        if found {
            out.push(',');
        }
        found = true;
        let text = String::from_utf8_lossy(value.as_bytes());
        for (i, word) in text.split_whitespace().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(word);
        }
    }
    found
}

/// Each path segment URI-encoded (non-S3 services encode the already-encoded path once more).
fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.split('/').map(uri_encode).collect::<Vec<_>>().join("/")
}

/// Query parameters decoded, re-encoded, and sorted by name then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(&percent_decode(k)), uri_encode(&percent_decode(v)))
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    /// AWS's documented example: the canonical request custody builds for it hashes to the
    /// published value (the signature itself is checked in custody-crypto).
    #[test]
    fn canonical_request_of_the_aws_example() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("iam.amazonaws.com"));
        headers.insert("content-type", HeaderValue::from_static("application/x-www-form-urlencoded;  charset=utf-8 "));
        headers.insert("x-amz-date", HeaderValue::from_static("20150830T123600Z"));
        let req = RequestParts {
            method: "GET",
            path: "/",
            query: "Version=2010-05-08&Action=ListUsers",
            headers: &headers,
            body: b"",
        };
        let signed: Vec<String> = ["content-type", "host", "x-amz-date"].map(String::from).to_vec();
        let c = canonical_request(&req, &signed).unwrap();
        assert_eq!(
            sigv4::sha256_hex(c.as_bytes()),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59",
            "{c}"
        );
        assert!(canonical_request(&req, &["x-missing".to_string()]).is_none());
    }

    #[test]
    fn authorization_header_parsing() {
        let ok = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
        let a = parse_authorization(ok).unwrap();
        assert_eq!(
            (a.access_key_id.as_str(), a.region.as_str(), a.service.as_str()),
            ("AKIDEXAMPLE", "us-east-1", "kms")
        );
        assert_eq!(a.signed_headers, ["host", "x-amz-date"]);
        for bad in [
            "AWS4-HMAC-SHA1 Credential=a/20150830/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=a/20150830/us-east-1/kms/aws4_request, SignedHeaders=host",
            "AWS4-HMAC-SHA256 Credential=a/2015/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
            "AWS4-HMAC-SHA256 Credential=a/20150830/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=zz",
            "AWS4-HMAC-SHA256 Credential=a/20150830/us-east-1/kms/aws4_request, SignedHeaders=Host, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
            "garbage",
        ] {
            assert_eq!(parse_authorization(bad).unwrap_err().code, "IncompleteSignatureException", "{bad}");
        }
    }

    #[test]
    fn encodings() {
        assert_eq!(canonical_query("b=2&a=1&a=0"), "a=0&a=1&b=2");
        assert_eq!(canonical_query("x=a%20b"), "x=a%20b");
        assert_eq!(uri_encode("a b/c~"), "a%20b%2Fc~");
        assert_eq!(canonical_uri("/"), "/");
        // A header sent twice: each value trimmed, inner runs of spaces collapsed, joined by commas.
        let mut headers = HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("  a \t  b "));
        headers.append("x-multi", HeaderValue::from_static("c"));
        headers.append("x-empty", HeaderValue::from_static(""));
        assert_eq!(header_value(&headers, "x-multi").as_deref(), Some("a b,c"));
        assert_eq!(header_value(&headers, "x-empty").as_deref(), Some(""));
        assert_eq!(header_value(&headers, "x-absent"), None);
    }
}
