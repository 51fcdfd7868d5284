//! Webhook signatures: HMAC-SHA256 over the exact raw body, in the two
//! header styles providers use.
//!
//! - **Stripe style** — header [`STRIPE_HEADER`]: `t=<unix seconds>,v1=<hex>`
//!   where the MAC covers `"{t}.{body}"`. The timestamp bounds replays: the
//!   receiver refuses it outside a tolerance window (±300 s in the design).
//!   A header may carry several `v1=` entries (one per live secret during a
//!   rotation).
//! - **GitHub style** — header [`GITHUB_HEADER`]: `sha256=<hex>` over the body
//!   alone, plus a delivery id in [`GITHUB_DELIVERY_HEADER`] and the event
//!   type in [`GITHUB_EVENT_HEADER`].
//!
//! Verification accepts any of several secrets (rotation) and compares MACs
//! in constant time (`hmac`'s `verify_slice`); it always works on the raw
//! bytes received, never on re-serialized JSON.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Stripe-style signature header.
pub const STRIPE_HEADER: &str = "Stripe-Signature";
/// GitHub-style signature header.
pub const GITHUB_HEADER: &str = "X-Hub-Signature-256";
/// GitHub-style delivery id header (unique per delivery attempt).
pub const GITHUB_DELIVERY_HEADER: &str = "X-GitHub-Delivery";
/// GitHub-style event type header.
pub const GITHUB_EVENT_HEADER: &str = "X-GitHub-Event";

/// Which header style a provider signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// `t=…,v1=…` over `"{t}.{body}"`.
    Stripe,
    /// `sha256=…` over the body.
    Github,
}

impl std::str::FromStr for Scheme {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stripe" => Ok(Scheme::Stripe),
            "github" => Ok(Scheme::Github),
            other => Err(format!("unknown scheme {other:?} (stripe|github)")),
        }
    }
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The header is missing parts or is not in the scheme's format.
    #[error("malformed signature header: {0}")]
    Malformed(&'static str),
    /// The signed timestamp is outside the tolerance window.
    #[error("signature timestamp {t} is more than {tolerance_s}s from now ({now})")]
    Stale { t: i64, now: i64, tolerance_s: i64 },
    /// No live secret produces this MAC.
    #[error("signature does not match")]
    Mismatch,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// Hex HMAC-SHA256 of the concatenation of `parts` under `secret`.
pub fn hmac_sha256_hex(secret: &[u8], parts: &[&[u8]]) -> String {
    let mut m = mac(secret);
    for p in parts {
        m.update(p);
    }
    hex::encode(m.finalize().into_bytes())
}

fn matches(secret: &[u8], parts: &[&[u8]], hex_sig: &str) -> bool {
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut m = mac(secret);
    for p in parts {
        m.update(p);
    }
    m.verify_slice(&sig).is_ok()
}

/// The Stripe-style header value for `body` signed at unix time `t`.
pub fn stripe_header(secret: &[u8], t: i64, body: &[u8]) -> String {
    let t_text = t.to_string();
    let sig = hmac_sha256_hex(secret, &[t_text.as_bytes(), b".", body]);
    format!("t={t},v1={sig}")
}

/// Verifies a Stripe-style `header` over the raw `body` against any of
/// `secrets`, with `|now - t| <= tolerance_s`. Returns the signed timestamp.
pub fn verify_stripe(
    secrets: &[&[u8]],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_s: i64,
) -> Result<i64, Error> {
    let mut t: Option<&str> = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => sigs.push(v),
            Some(_) => {} // other schemes (v0 …) are ignored, as Stripe's own libraries do
            None => return Err(Error::Malformed("part without '='")),
        }
    }
    let t_text = t.ok_or(Error::Malformed("no t= timestamp"))?;
    let t: i64 = t_text
        .parse()
        .map_err(|_| Error::Malformed("t= is not an integer"))?;
    if sigs.is_empty() {
        return Err(Error::Malformed("no v1= signature"));
    }
    if (now - t).abs() > tolerance_s {
        return Err(Error::Stale {
            t,
            now,
            tolerance_s,
        });
    }
    let parts: [&[u8]; 3] = [t_text.as_bytes(), b".", body];
    let ok = secrets
        .iter()
        .any(|secret| sigs.iter().any(|sig| matches(secret, &parts, sig)));
    if ok { Ok(t) } else { Err(Error::Mismatch) }
}

/// The GitHub-style header value for `body`.
pub fn github_header(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hmac_sha256_hex(secret, &[body]))
}

/// Verifies a GitHub-style `header` over the raw `body` against any of
/// `secrets`.
pub fn verify_github(secrets: &[&[u8]], header: &str, body: &[u8]) -> Result<(), Error> {
    let sig = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(Error::Malformed("no sha256= prefix"))?;
    if secrets.iter().any(|secret| matches(secret, &[body], sig)) {
        Ok(())
    } else {
        Err(Error::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_round_trip_and_refusals() {
        let body = br#"{"id":"evt_1"}"#;
        let h = stripe_header(b"s3cret", 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="));
        assert_eq!(
            verify_stripe(&[b"old", b"s3cret"], &h, body, 1_700_000_100, 300),
            Ok(1_700_000_000)
        );
        assert_eq!(
            verify_stripe(&[b"other"], &h, body, 1_700_000_000, 300),
            Err(Error::Mismatch)
        );
        assert_eq!(
            verify_stripe(&[b"s3cret"], &h, b"{\"id\":\"evt_2\"}", 1_700_000_000, 300),
            Err(Error::Mismatch)
        );
        assert!(matches!(
            verify_stripe(&[b"s3cret"], &h, body, 1_700_000_301, 300),
            Err(Error::Stale { .. })
        ));
        assert!(matches!(
            verify_stripe(&[b"s3cret"], "v1=ab", body, 0, 300),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", &[b"what do ya want ", b"for nothing?"]),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn github_round_trip() {
        let h = github_header(b"k", b"body");
        assert_eq!(verify_github(&[b"k"], &h, b"body"), Ok(()));
        assert_eq!(verify_github(&[b"k"], &h, b"body!"), Err(Error::Mismatch));
        assert!(matches!(
            verify_github(&[b"k"], "abc", b"body"),
            Err(Error::Malformed(_))
        ));
    }
}
