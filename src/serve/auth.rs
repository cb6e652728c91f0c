//! Request authentication: a bearer token and an optional HMAC-SHA256 body signature,
//! both compared in constant time.
//!
//! In: the request's headers and raw body. Out: `Ok` or an [`AuthError`] the HTTP layer
//! turns into 401. The signature is Grafana's webhook HMAC: lowercase hex of
//! HMAC-SHA256(secret, body), or of `timestamp + ":" + body` when a timestamp header is
//! configured (Grafana's "Timestamp header" option).

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>` (the contents of [serve] token_file)")]
    MissingToken,
    #[error("wrong bearer token: check the sender's credentials_file against [serve] token_file")]
    WrongToken,
    #[error("missing signature header {0}: configure the sender's HMAC secret or remove [serve] hmac_secret_file")]
    MissingSignature(String),
    #[error("signature in {0} does not match the body: check the shared HMAC secret")]
    BadSignature(String),
    #[error("timestamp in {header} is not Unix seconds: the sender must sign with Grafana's timestamp header")]
    BadTimestamp { header: String },
    #[error("signed timestamp {ts} is {off} s from this host's clock, more than [serve] signature_max_skew ({max} s): a replayed delivery, or a clock off (check NTP on both hosts)")]
    StaleTimestamp { ts: i64, off: i64, max: u64 },
}

/// What a request must carry.
#[derive(Clone, Default)]
pub struct Auth {
    pub token: Option<Vec<u8>>,
    pub hmac_secret: Option<Vec<u8>>,
    pub signature_header: String,
    pub timestamp_header: Option<String>,
    /// A signed timestamp further than this from now is refused.
    pub max_skew: std::time::Duration,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("hmac_secret", &self.hmac_secret.as_ref().map(|_| "<redacted>"))
            .field("signature_header", &self.signature_header)
            .finish()
    }
}

impl Auth {
    /// Checks the bearer token, if one is configured.
    pub fn check_token(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let Some(want) = &self.token else { return Ok(()) };
        let got = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 9110 §11.1).
                let (scheme, rest) = v.trim_start().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(rest)
            })
            .ok_or(AuthError::MissingToken)?;
        if bool::from(got.trim().as_bytes().ct_eq(want)) {
            Ok(())
        } else {
            Err(AuthError::WrongToken)
        }
    }

    /// Checks the body signature, if a secret is configured.
    pub fn check_signature(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), AuthError> {
        self.check_signature_at(headers, body, chrono::Utc::now().timestamp())
    }

    /// [`Auth::check_signature`] with the clock given (`now`, Unix seconds). The
    /// signature is checked first, so an unsigned request learns nothing about the window.
    pub fn check_signature_at(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), AuthError> {
        let Some(secret) = &self.hmac_secret else { return Ok(()) };
        let name = &self.signature_header;
        let got = headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| AuthError::MissingSignature(name.clone()))?;
        let got = got.trim();
        let got = got.strip_prefix("sha256=").unwrap_or(got);
        let got = decode_hex(got).ok_or_else(|| AuthError::BadSignature(name.clone()))?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        let mut stamp = None;
        if let Some(th) = &self.timestamp_header {
            let ts = headers
                .get(th.as_str())
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| AuthError::MissingSignature(th.clone()))?;
            mac.update(ts.as_bytes());
            mac.update(b":");
            stamp = Some((th, ts));
        }
        mac.update(body);
        // verify_slice compares in constant time.
        mac.verify_slice(&got).map_err(|_| AuthError::BadSignature(name.clone()))?;
        if let Some((th, ts)) = stamp {
            let ts: i64 = ts.trim().parse().map_err(|_| AuthError::BadTimestamp { header: th.clone() })?;
            let off = now.saturating_sub(ts);
            if off.unsigned_abs() > self.max_skew.as_secs() {
                return Err(AuthError::StaleTimestamp { ts, off, max: self.max_skew.as_secs() });
            }
        }
        Ok(())
    }
}

/// Hex signature of `body` under `secret` (for senders and tests).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 256 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth() -> Auth {
        Auth {
            token: Some(b"tok".to_vec()),
            hmac_secret: Some(b"key".to_vec()),
            signature_header: "X-Grafana-Alerting-Signature".into(),
            timestamp_header: None,
            max_skew: std::time::Duration::from_secs(300),
        }
    }

    #[test]
    fn token_must_match_exactly() {
        let a = auth();
        let mut h = HeaderMap::new();
        assert_eq!(a.check_token(&h), Err(AuthError::MissingToken));
        h.insert("authorization", HeaderValue::from_static("Bearer to"));
        assert_eq!(a.check_token(&h), Err(AuthError::WrongToken));
        h.insert("authorization", HeaderValue::from_static("Bearer tok"));
        assert_eq!(a.check_token(&h), Ok(()));
        for scheme in ["bearer tok", "BEARER tok", "BeArEr tok"] {
            h.insert("authorization", HeaderValue::from_static(scheme));
            assert_eq!(a.check_token(&h), Ok(()), "{scheme}");
        }
        h.insert("authorization", HeaderValue::from_static("Basic tok"));
        assert_eq!(a.check_token(&h), Err(AuthError::MissingToken));
        assert_eq!(Auth::default().check_token(&HeaderMap::new()), Ok(()));
    }

    #[test]
    fn signature_over_the_body() {
        let a = auth();
        let body = br#"{"version":"1"}"#;
        let mut h = HeaderMap::new();
        assert!(matches!(a.check_signature(&h, body), Err(AuthError::MissingSignature(_))));
        h.insert("x-grafana-alerting-signature", HeaderValue::from_str(&sign(b"key", body)).unwrap());
        assert_eq!(a.check_signature(&h, body), Ok(()));
        assert!(matches!(a.check_signature(&h, b"{}"), Err(AuthError::BadSignature(_))));
        h.insert("x-grafana-alerting-signature", HeaderValue::from_static("zz"));
        assert!(matches!(a.check_signature(&h, body), Err(AuthError::BadSignature(_))));
    }

    #[test]
    fn timestamped_signature() {
        let mut a = auth();
        a.timestamp_header = Some("X-Grafana-Alerting-Signature-Timestamp".into());
        let body = b"{}";
        let mut h = HeaderMap::new();
        h.insert("x-grafana-alerting-signature-timestamp", HeaderValue::from_static("1700000000"));
        h.insert("x-grafana-alerting-signature", HeaderValue::from_str(&sign(b"key", b"1700000000:{}")).unwrap());
        assert_eq!(a.check_signature_at(&h, body, 1_700_000_000 + 299), Ok(()));
        assert_eq!(a.check_signature_at(&h, body, 1_700_000_000 - 299), Ok(()));
        // A correctly signed delivery from outside the window: refused, and the answer says why.
        let e = a.check_signature_at(&h, body, 1_700_000_000 + 301).unwrap_err();
        assert_eq!(e, AuthError::StaleTimestamp { ts: 1_700_000_000, off: 301, max: 300 });
        assert!(e.to_string().contains("signature_max_skew"), "{e}");
        // A signed timestamp from 2001, as in the report: refused against today's clock.
        h.insert("x-grafana-alerting-signature-timestamp", HeaderValue::from_static("1000000000"));
        h.insert("x-grafana-alerting-signature", HeaderValue::from_str(&sign(b"key", b"1000000000:{}")).unwrap());
        assert!(matches!(a.check_signature(&h, body), Err(AuthError::StaleTimestamp { .. })));
        h.insert("x-grafana-alerting-signature-timestamp", HeaderValue::from_static("soon"));
        h.insert("x-grafana-alerting-signature", HeaderValue::from_str(&sign(b"key", b"soon:{}")).unwrap());
        assert!(matches!(a.check_signature(&h, body), Err(AuthError::BadTimestamp { .. })));
    }

    /// The signature is the one an independent implementation computes: `openssl dgst
    /// -sha256 -hmac KEY` over the same bytes.
    #[test]
    fn signature_matches_openssl() {
        let Some(openssl) = crate::serve::perms::resolve_program("openssl") else {
            panic!("openssl is not installed: it is the independent HMAC signer this test needs (apt install openssl)")
        };
        let body = b"1700000000:{\"version\":\"1\",\"alerts\":[]}";
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("body");
        std::fs::write(&f, body).unwrap();
        let out = std::process::Command::new(openssl)
            .args(["dgst", "-sha256", "-hmac", "s3cr3t-key", "-r"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let theirs = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string();
        assert_eq!(sign(b"s3cr3t-key", body), theirs);
    }
}
