//! Exact money: assets with a scale, amounts bound to that scale, and the strict wire format.
//!
//! Amounts are `rust_decimal::Decimal`, never floats, and travel as JSON
//! *strings*: a JSON number would have passed through an `f64` in many
//! clients, so it is refused rather than trusted. Parsing never rounds: an
//! amount with more fractional digits than its asset allows is an error.
use crate::error::{Error, Result};
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Largest asset scale (the `assets.scale` CHECK in SQL says the same): 18
/// covers wei; together with [`MAX_SIGNIFICANT_DIGITS`] it leaves room for
/// ten integer digits even at full scale.
pub const MAX_SCALE: u32 = 18;

/// `Decimal` holds a 96-bit mantissa, i.e. every 28-digit number exactly (and
/// only some 29-digit ones): more significant digits than this are refused
/// rather than rounded.
pub const MAX_SIGNIFICANT_DIGITS: usize = 28;

/// An asset and the number of fractional digits its amounts may carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Asset {
    /// Ticker-like code, e.g. `BTC`, `USD`.
    pub code: String,
    /// Fractional digits allowed, 0..=[`MAX_SCALE`].
    pub scale: u32,
}

impl Asset {
    /// Parses `s` as an amount of this asset (see [`Amount::parse`]).
    pub fn amount(&self, s: &str) -> Result<Amount> {
        Amount::parse(s, self.scale)
    }
}

/// A non-zero, exact amount of money with at most `scale` fractional digits.
///
/// Amounts parsed from input are positive; a negative `Amount` (via `-amount`)
/// is a debit posting in [`crate::ledger::transfer`]. Zero is never an
/// `Amount`: a zero transfer or hold is always a bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amount {
    value: Decimal,
    scale: u32,
}

impl Amount {
    /// Parses a plain, positive decimal string such as `"12.5"` or
    /// `"0.00000001"` for an asset with `scale` fractional digits.
    ///
    /// Refused, never rounded: empty input, surrounding whitespace, any sign
    /// (`-1` and `+1`), exponents (`1e5`), `NaN`/`Infinity`, leading zeros
    /// (`01`), a bare `.` edge (`.5`, `5.`), zero, more than
    /// [`MAX_SIGNIFICANT_DIGITS`] significant digits, and more fractional
    /// digits than `scale`.
    pub fn parse(s: &str, scale: u32) -> Result<Amount> {
        check_scale_param(scale)?;
        let syntax = check_syntax(s).map_err(|reason| invalid(s, reason))?;
        if syntax.fraction_digits > scale as usize {
            return Err(invalid(s, "more fractional digits than the asset's scale"));
        }
        let value =
            Decimal::from_str_exact(s).map_err(|_| invalid(s, "not representable exactly"))?;
        if value.is_zero() {
            return Err(invalid(s, "must be greater than zero"));
        }
        Ok(Amount { value, scale })
    }

    /// Wraps an already exact `value` (of either sign) for an asset with
    /// `scale` fractional digits; refuses zero and excess fractional digits.
    pub fn from_decimal(value: Decimal, scale: u32) -> Result<Amount> {
        check_scale_param(scale)?;
        if value.is_zero() {
            return Err(invalid(&value.to_string(), "must not be zero"));
        }
        if value.normalize().scale() > scale {
            return Err(invalid(
                &value.to_string(),
                "more fractional digits than the asset's scale",
            ));
        }
        Ok(Amount { value, scale })
    }

    /// The exact value.
    pub fn value(&self) -> Decimal {
        self.value
    }

    /// The asset scale this amount was checked against.
    pub fn scale(&self) -> u32 {
        self.scale
    }

    /// True for a debit (a negative posting).
    pub fn is_negative(&self) -> bool {
        self.value.is_sign_negative()
    }

    /// The same amount, positive.
    pub fn abs(&self) -> Amount {
        Amount {
            value: self.value.abs(),
            scale: self.scale,
        }
    }
}

impl std::ops::Neg for Amount {
    type Output = Amount;

    fn neg(self) -> Amount {
        Amount {
            value: -self.value,
            scale: self.scale,
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

/// Serialized as a JSON string, like every amount on the wire.
impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.value)
    }
}

/// An amount as received on the wire, before its asset (and so its scale) is
/// known: a JSON **string** holding a plain positive decimal.
///
/// Deserializing checks everything that does not depend on the asset (a JSON
/// number, `"1e5"`, `"-1"`, `"0"` … are refused right away); turn it into an
/// [`Amount`] with [`AmountStr::to_amount`] once the asset's scale is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AmountStr(String);

impl AmountStr {
    /// Validates `s` as a plain positive decimal of at most [`MAX_SCALE`]
    /// fractional digits.
    pub fn parse(s: &str) -> Result<AmountStr> {
        Amount::parse(s, MAX_SCALE)?;
        Ok(AmountStr(s.to_owned()))
    }

    /// The text as received.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The amount for an asset with `scale` fractional digits.
    pub fn to_amount(&self, scale: u32) -> Result<Amount> {
        Amount::parse(&self.0, scale)
    }
}

impl FromStr for AmountStr {
    type Err = Error;

    fn from_str(s: &str) -> Result<AmountStr> {
        AmountStr::parse(s)
    }
}

impl fmt::Display for AmountStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for AmountStr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AmountStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        // Only the string visits are implemented: serde's defaults turn a
        // number (or anything else) into an "invalid type" error.
        impl serde::de::Visitor<'_> for Visitor {
            type Value = AmountStr;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal amount as a JSON string, e.g. \"12.5\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AmountStr, E> {
                AmountStr::parse(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}

fn invalid(input: &str, reason: &'static str) -> Error {
    // Echoing megabytes of garbage back in an error helps nobody.
    let mut shown: String = input.chars().take(64).collect();
    if shown.len() < input.len() {
        shown.push('…');
    }
    Error::InvalidAmount {
        input: shown,
        reason,
    }
}

fn check_scale_param(scale: u32) -> Result<()> {
    if scale > MAX_SCALE {
        return Err(Error::Invalid(format!(
            "asset scale {scale} exceeds the maximum of {MAX_SCALE}"
        )));
    }
    Ok(())
}

struct Syntax {
    fraction_digits: usize,
}

/// The grammar `(0|[1-9][0-9]*)(\.[0-9]+)?` with at most
/// [`MAX_SIGNIFICANT_DIGITS`] significant digits, with a specific reason for
/// each way to miss it.
fn check_syntax(s: &str) -> std::result::Result<Syntax, &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.trim() != s {
        return Err("leading or trailing whitespace");
    }
    if s.starts_with('-') {
        return Err("negative amounts are not accepted");
    }
    if s.starts_with('+') {
        return Err("an explicit sign is not accepted");
    }
    if !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        if s.bytes().any(|b| b == b'e' || b == b'E')
            && s.bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        {
            return Err("exponent notation is not accepted");
        }
        return Err("not a plain decimal number");
    }
    let (int, frac) = match s.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (s, None),
    };
    if int.is_empty() {
        return Err("missing integer digits before '.'");
    }
    if let Some(frac) = frac {
        if frac.is_empty() {
            return Err("missing fractional digits after '.'");
        }
        if frac.contains('.') {
            return Err("more than one '.'");
        }
    }
    if int.len() > 1 && int.starts_with('0') {
        return Err("leading zeros are not accepted");
    }
    let frac = frac.unwrap_or("");
    // Significant digits: everything from the first non-zero digit on,
    // trailing zeros included (they occupy the mantissa too).
    let significant = int
        .bytes()
        .chain(frac.bytes())
        .skip_while(|&b| b == b'0')
        .count();
    if significant > MAX_SIGNIFICANT_DIGITS {
        return Err("more than 28 significant digits");
    }
    Ok(Syntax {
        fraction_digits: frac.len(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn reason(r: Result<Amount>) -> &'static str {
        match r {
            Err(Error::InvalidAmount { reason, .. }) => reason,
            other => panic!("expected InvalidAmount, got {other:?}"),
        }
    }

    #[test]
    fn accepts_plain_decimals() {
        let a = Amount::parse("12.5", 2).unwrap();
        assert_eq!(a.value(), Decimal::from_str("12.5").unwrap());
        assert_eq!(a.scale(), 2);
        assert_eq!(
            Amount::parse("0.00000001", 8).unwrap().value(),
            Decimal::new(1, 8)
        );
        assert_eq!(Amount::parse("100", 0).unwrap().value(), Decimal::from(100));
        // Trailing zeros within the scale are fine and keep their value.
        assert_eq!(
            Amount::parse("1.50", 2).unwrap().value(),
            Decimal::from_str("1.5").unwrap()
        );
        assert_eq!(Amount::parse("0.5", 1).unwrap().to_string(), "0.5");
    }

    #[test]
    fn accepts_exactly_28_significant_digits() {
        let s = "1234567890123456789012345678"; // 28 digits
        assert_eq!(Amount::parse(s, 0).unwrap().to_string(), s);
        let s = "1234567890.123456789012345678"; // 10 + 18
        assert_eq!(Amount::parse(s, 18).unwrap().to_string(), s);
        // Leading zeros of a fraction are not significant.
        assert!(Amount::parse("0.000000000000000001", 18).is_ok());
    }

    #[test]
    fn refuses_29_significant_digits() {
        assert_eq!(
            reason(Amount::parse("12345678901234567890123456789", 0)),
            "more than 28 significant digits"
        );
        assert_eq!(
            reason(Amount::parse("12345678901.123456789012345678", 18)),
            "more than 28 significant digits"
        );
    }

    #[test]
    fn refuses_more_fractional_digits_than_scale() {
        assert_eq!(
            reason(Amount::parse("0.000000001", 8)),
            "more fractional digits than the asset's scale"
        );
        assert_eq!(
            reason(Amount::parse("1.005", 2)),
            "more fractional digits than the asset's scale"
        );
        // Even zeros: the wire format is checked digit by digit, never rounded.
        assert_eq!(
            reason(Amount::parse("1.000", 2)),
            "more fractional digits than the asset's scale"
        );
        assert_eq!(
            reason(Amount::parse("1.5", 0)),
            "more fractional digits than the asset's scale"
        );
    }

    #[test]
    fn refuses_exponents_and_non_numbers() {
        assert_eq!(
            reason(Amount::parse("1e5", 8)),
            "exponent notation is not accepted"
        );
        assert_eq!(
            reason(Amount::parse("1.5E-3", 8)),
            "exponent notation is not accepted"
        );
        for s in [
            "NaN", "nan", "Infinity", "inf", "1,5", "0x10", "1_000", "½", "١",
        ] {
            assert_eq!(
                reason(Amount::parse(s, 8)),
                "not a plain decimal number",
                "{s}"
            );
        }
    }

    #[test]
    fn refuses_signs() {
        assert_eq!(
            reason(Amount::parse("-1", 8)),
            "negative amounts are not accepted"
        );
        assert_eq!(
            reason(Amount::parse("+1", 8)),
            "an explicit sign is not accepted"
        );
        assert_eq!(
            reason(Amount::parse("-0", 8)),
            "negative amounts are not accepted"
        );
    }

    #[test]
    fn refuses_zero() {
        for s in ["0", "0.0", "0.00000000"] {
            assert_eq!(
                reason(Amount::parse(s, 8)),
                "must be greater than zero",
                "{s}"
            );
        }
        assert!(Amount::from_decimal(Decimal::ZERO, 8).is_err());
    }

    #[test]
    fn refuses_empty_whitespace_and_malformed() {
        assert_eq!(reason(Amount::parse("", 8)), "empty");
        for s in [" 1", "1 ", "\t1", "1\n", " "] {
            assert_eq!(
                reason(Amount::parse(s, 8)),
                "leading or trailing whitespace",
                "{s:?}"
            );
        }
        assert_eq!(
            reason(Amount::parse(".5", 8)),
            "missing integer digits before '.'"
        );
        assert_eq!(
            reason(Amount::parse("5.", 8)),
            "missing fractional digits after '.'"
        );
        assert_eq!(reason(Amount::parse("1.2.3", 8)), "more than one '.'");
        assert_eq!(
            reason(Amount::parse("01", 8)),
            "leading zeros are not accepted"
        );
        assert_eq!(
            reason(Amount::parse("00.1", 8)),
            "leading zeros are not accepted"
        );
    }

    #[test]
    fn refuses_scales_beyond_the_maximum() {
        assert!(matches!(Amount::parse("1", 19), Err(Error::Invalid(_))));
    }

    #[test]
    fn from_decimal_checks_scale_by_value() {
        let d = Decimal::from_str("-1.50").unwrap();
        let a = Amount::from_decimal(d, 1).unwrap();
        assert!(a.is_negative());
        assert_eq!(a.abs().value(), Decimal::from_str("1.5").unwrap());
        assert!(Amount::from_decimal(Decimal::from_str("1.55").unwrap(), 1).is_err());
        assert_eq!((-a).value(), Decimal::from_str("1.5").unwrap());
    }

    #[test]
    fn amount_serializes_as_a_string() {
        let a = Amount::parse("0.00000001", 8).unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), r#""0.00000001""#);
    }

    #[derive(Debug, Deserialize)]
    struct Req {
        amount: AmountStr,
    }

    #[test]
    fn amount_str_accepts_only_json_strings() {
        let r: Req = serde_json::from_str(r#"{"amount":"12.5"}"#).unwrap();
        assert_eq!(r.amount.as_str(), "12.5");
        assert_eq!(
            r.amount.to_amount(2).unwrap().value(),
            Decimal::from_str("12.5").unwrap()
        );
        // Valid on the wire, but too precise for a scale-0 asset.
        assert!(r.amount.to_amount(0).is_err());

        for bad in [
            r#"{"amount":1.5}"#,
            r#"{"amount":15}"#,
            r#"{"amount":null}"#,
            r#"{"amount":true}"#,
            r#"{"amount":["1"]}"#,
        ] {
            let err = serde_json::from_str::<Req>(bad).unwrap_err();
            assert!(err.to_string().contains("invalid type"), "{bad}: {err}");
        }
        for bad in [
            r#"{"amount":"1e5"}"#,
            r#"{"amount":"-1"}"#,
            r#"{"amount":"0"}"#,
            r#"{"amount":"NaN"}"#,
            r#"{"amount":" 1"}"#,
            r#"{"amount":""}"#,
            r#"{"amount":"12345678901234567890123456789"}"#,
            r#"{"amount":"0.0000000000000000001"}"#,
        ] {
            let err = serde_json::from_str::<Req>(bad).unwrap_err();
            assert!(err.to_string().contains("invalid amount"), "{bad}: {err}");
        }
    }

    #[test]
    fn amount_str_round_trips() {
        let a: AmountStr = "3.25".parse().unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), r#""3.25""#);
        assert!("1e3".parse::<AmountStr>().is_err());
    }
}
