//! The shape check of a JSON request body, before any handler parses it: no object repeats a
//! key (serde would take the last of two `base_amount`s, a proxy or a log the first), and no
//! string holds U+0000 (Postgres text cannot store it). The walk keeps no value: typed bodies
//! are parsed afterwards by their handlers.
use crate::error::{Error, Result};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;
use std::fmt;

/// Refuses a JSON body in which an object repeats a key, or a string (key
/// or value) holds U+0000. Syntax errors are refused too, with serde's
/// position (the handler would refuse the body anyway).
pub fn check_json_body(body: &[u8]) -> Result<()> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let checked = Strict
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| e.to_string());
    checked.map_err(|e| Error::Validation(format!("the JSON body is refused: {e}")))
}

/// A visitor that walks any JSON value, checking as it goes.
#[derive(Clone, Copy)]
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

fn no_nul<E: serde::de::Error>(s: &str) -> std::result::Result<(), E> {
    if s.contains('\0') {
        return Err(E::custom("strings may not contain U+0000"));
    }
    Ok(())
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
        Ok(())
    }
    // serde hands a fractional number to this callback; the walk drops it
    // unread. Amounts are decimal strings, parsed into `Decimal` by the typed
    // body later, which refuses a JSON number for an amount.
    fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<(), E> {
        no_nul(s)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while seq.next_element_seed(Strict)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        use serde::de::Error as _;
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            no_nul(&key)?;
            if !seen.insert(key.clone()) {
                return Err(A::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value_seed(Strict)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_refuse_duplicate_keys_and_nul() {
        assert!(check_json_body(br#"{"a":1,"b":{"a":2},"c":[{"a":3},{"a":4}]}"#).is_ok());
        assert!(check_json_body(br#""x""#).is_ok());
        for bad in [
            &br#"{"base_amount":"0.001","side":"buy","base_amount":"1.9"}"#[..],
            br#"{"a":{"x":1,"x":1}}"#,
            br#"[{"k":1,"k":2}]"#,
            br#"{"reason":"a\u0000b"}"#,
            br#"{"a\u0000":1}"#,
            br#"{"a":1} trailing"#,
            br#"{"a":"\ud800"}"#,
        ] {
            assert!(
                check_json_body(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
