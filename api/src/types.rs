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
