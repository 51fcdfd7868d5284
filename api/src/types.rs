//! Strict wire types for request bodies.
//!
//! poem-openapi's `String` accepts JSON numbers and booleans and turns them
//! into text (`5` → `"5"`). Request bodies here are strict instead: a field
//! documented as a string must be a JSON string, or the request is a 400
//! problem. (The same reasoning makes amounts strings, never numbers.)
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use serde_json::Value;
use std::borrow::Cow;

/// A JSON string, and only a JSON string.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl Text {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Type for Text {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "string".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new("string")))
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ParseFromJSON for Text {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(s)) => Ok(Text(s)),
            Some(other) => Err(ParseError::expected_type(other)),
            None => Err(ParseError::expected_input()),
        }
    }
}

impl ToJSON for Text {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_strings_parse() {
        assert_eq!(
            Text::parse_from_json(Some(Value::from("x"))).ok(),
            Some(Text("x".into()))
        );
        assert!(Text::parse_from_json(Some(Value::from(5))).is_err());
        assert!(Text::parse_from_json(Some(Value::Bool(true))).is_err());
        assert!(Text::parse_from_json(Some(Value::Null)).is_err());
        assert!(Text::parse_from_json(None).is_err());
    }
}

/// Characters no text field may hold: C0 controls but tab, line feed and
/// carriage return, DEL and C1 controls, and the bidi controls (as
/// [`crate::input::check_text`] refuses them), as a regex class body.
const PROSE_EXCLUDED: &str =
    r"\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069";

/// What a single-line field may not hold besides: every control, and the
/// invisible characters of [`crate::input::is_invisible`] (BMP ones).
const LINE_EXCLUDED: &str = r"\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8";

/// A string schema with the given bounds and pattern.
fn string_schema(min: usize, max: usize, pattern: String) -> MetaSchemaRef {
    let mut schema = MetaSchema::new("string");
    schema.min_length = Some(min);
    schema.max_length = Some(max);
    schema.pattern = Some(pattern);
    MetaSchemaRef::Inline(Box::new(schema))
}

/// A JSON-string wire type whose schema carries the rules the handlers
/// enforce (so clients and fuzzers see them); parsing takes any JSON string
/// and the handler refuses what breaks the rules with a precise problem.
macro_rules! constrained_text {
    ($(#[$doc:meta])* $name:ident, $schema:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Type for $name {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> Cow<'static, str> {
                "string".into()
            }

            fn schema_ref() -> MetaSchemaRef {
                $schema
            }

            fn as_raw_value(&self) -> Option<&Self::RawValueType> {
                Some(self)
            }

            fn raw_element_iter<'a>(
                &'a self,
            ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
                Box::new(self.as_raw_value().into_iter())
            }

            fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        impl ParseFromJSON for $name {
            fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
                Text::parse_from_json(value)
                    .map(|t| $name(t.0))
                    .map_err(ParseError::propagate)
            }
        }

        impl ToJSON for $name {
            fn to_json(&self) -> Option<Value> {
                Some(Value::String(self.0.clone()))
            }
        }
    };
}

constrained_text!(
    /// Why an admin acts: 1–1000 characters, not blank; line breaks and
    /// tabs allowed, no other control or bidi character.
    Reason,
    string_schema(
        1,
        ledgerflow_payments::audit::MAX_REASON_CHARS,
        format!(r"^[^{PROSE_EXCLUDED}]*[^\s{PROSE_EXCLUDED}][^{PROSE_EXCLUDED}]*$")
    )
);

constrained_text!(
    /// A filter or a name: one line of at most 200 visible characters (no
    /// control, bidi or invisible character); empty means "no filter".
    FilterText,
    string_schema(0, 200, format!(r"^[^{LINE_EXCLUDED}]*$"))
);

constrained_text!(
    /// An asset code: 2–16 of `A–Z 0–9`.
    AssetCode,
    string_schema(2, 16, r"^[A-Z0-9]{2,16}$".to_string())
);

constrained_text!(
    /// A positive decimal amount as a string: digits, at most one `.`
    /// followed by digits, no sign, exponent or leading zero; at most 28
    /// digits and at most the asset's scale after the point.
    AmountText,
    string_schema(1, 29, r"^(0|[1-9][0-9]*)(\.[0-9]+)?$".to_string())
);

constrained_text!(
    /// A withdrawal address: visible ASCII (single spaces between groups,
    /// for IBANs), 1–128 characters; the asset's format and checksum are
    /// checked too (see `ledgerflow_payments::address`).
    AddressText,
    string_schema(1, 128, r"^[\x21-\x7E]+( [\x21-\x7E]+)*$".to_string())
);

/// The `Idempotency-Key` rule: 1–255 visible ASCII characters.
pub const IDEMPOTENCY_KEY_PATTERN: &str = r"^[\x21-\x7E]{1,255}$";
/// The rule of text filters in query strings (see [`FilterText`]).
pub const FILTER_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F\u00AD\u034F\u061C\u115F\u1160\u17B4\u17B5\u180B-\u180F\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\u3164\uFE00-\uFE0F\uFEFF\uFFA0\uFFF0-\uFFF8]*$";

#[cfg(test)]
mod constrained_tests {
    use super::*;

    #[test]
    fn the_query_filter_pattern_is_the_body_filters() {
        assert_eq!(FILTER_PATTERN, format!(r"^[^{LINE_EXCLUDED}]*$"));
    }

    #[test]
    fn constrained_types_are_strings_with_their_rules() {
        let MetaSchemaRef::Inline(s) = Reason::schema_ref() else {
            panic!("inline schema expected");
        };
        assert_eq!((s.min_length, s.max_length), (Some(1), Some(1000)));
        assert!(Reason::parse_from_json(Some(Value::from(5))).is_err());
        assert_eq!(
            AssetCode::parse_from_json(Some(Value::from("BTC"))).ok(),
            Some(AssetCode("BTC".into()))
        );
    }
}
