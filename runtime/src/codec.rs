//! Mapping between serde enums and the wire: a variant name plus a JSON object of its fields.
//!
//! Commands arrive as (subject token, body) and events are stored as (`ce-type` header, payload).
//! Both are the externally tagged form `{"Variant": {fields}}` split in two, so user types need
//! nothing but serde derives.

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserializer, Serialize, forward_to_deserialize_any};
use serde_json::{Map, Value};

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The type does not serialize as an externally tagged enum variant.
    #[error("{0} must serialize as an externally tagged enum variant (serde's default)")]
    NotAnEnum(&'static str),
    /// The payload or body does not fit the variant.
    #[error("{0}")]
    Invalid(String),
}

/// Splits an enum value into its variant name and its fields as JSON bytes.
pub fn encode_variant<T: Serialize>(value: &T) -> Result<(String, Vec<u8>), CodecError> {
    let json = serde_json::to_value(value).map_err(|e| CodecError::Invalid(e.to_string()))?;
    let (name, fields) = match json {
        Value::String(name) => (name, Value::Object(Map::new())),
        Value::Object(map) if map.len() == 1 => {
            let Some((name, fields)) = map.into_iter().next() else {
                return Err(CodecError::NotAnEnum(std::any::type_name::<T>()));
            };
            (name, fields)
        }
        _ => return Err(CodecError::NotAnEnum(std::any::type_name::<T>())),
    };
    let bytes = serde_json::to_vec(&fields).map_err(|e| CodecError::Invalid(e.to_string()))?;
    Ok((name, bytes))
}

/// Rebuilds an enum value from its variant name and its fields.
///
/// Errors name the failing field as a JSON pointer, for example `/amount: invalid type: string
/// "x", expected u64`.
pub fn decode_variant<T: DeserializeOwned>(name: &str, fields: Value) -> Result<T, CodecError> {
    let unit_variant = fields.as_object().is_some_and(Map::is_empty);
    let mut tagged = Map::new();
    tagged.insert(name.to_owned(), fields);
    match decode_tagged(Value::Object(tagged)) {
        // A unit variant (`Closed` rather than `Closed {}`) is stored with an empty object.
        Err(err) if unit_variant => decode_tagged(Value::String(name.to_owned())).map_err(|_| err),
        result => result,
    }
}

fn decode_tagged<T: DeserializeOwned>(value: Value) -> Result<T, CodecError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        // The first path segment is the variant name itself; users know it from the subject.
        let path = err
            .path()
            .iter()
            .skip(1)
            .map(|s| s.to_string())
            .collect::<Vec<_>>();
        let inner = err.into_inner().to_string();
        if path.is_empty() {
            CodecError::Invalid(inner)
        } else {
            CodecError::Invalid(format!("/{}: {inner}", path.join("/")))
        }
    })
}

/// The variant names of an enum type, as serde sees them (after `rename_all`).
///
/// Returns an empty list for types that are not enums.
pub fn variant_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut probe = VariantProbe(None);
    // The probe always fails; it only records what the derive asked for.
    let _ = T::deserialize(&mut probe);
    probe.0.unwrap_or(&[])
}

/// A deserializer that records the variant list a derived enum asks for, then stops.
struct VariantProbe(Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for &mut VariantProbe {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not an enum"))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = Some(variants);
        Err(de::Error::custom("variants recorded"))
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    enum Command {
        Deposit { amount: u64 },
        Close {},
        Ping,
    }

    #[test]
    fn a_struct_variant_splits_into_name_and_fields() {
        let (name, bytes) = encode_variant(&Command::Deposit { amount: 5 }).unwrap();
        assert_eq!(name, "deposit");
        assert_eq!(bytes, br#"{"amount":5}"#);
    }

    #[test]
    fn empty_and_unit_variants_store_an_empty_object_and_decode_back() {
        assert_eq!(encode_variant(&Command::Close {}).unwrap().1, b"{}");
        assert_eq!(encode_variant(&Command::Ping).unwrap().1, b"{}");
        let close: Command = decode_variant("close", serde_json::json!({})).unwrap();
        let ping: Command = decode_variant("ping", serde_json::json!({})).unwrap();
        assert_eq!((close, ping), (Command::Close {}, Command::Ping));
    }

    #[test]
    fn decoding_errors_name_the_field() {
        let err = decode_variant::<Command>("deposit", serde_json::json!({"amount": "x"}));
        let Err(CodecError::Invalid(message)) = err else {
            panic!("expected an error, got {err:?}")
        };
        assert!(message.starts_with("/amount: invalid type"), "{message}");
    }

    #[test]
    fn a_missing_field_is_reported_as_missing() {
        let err = decode_variant::<Command>("deposit", serde_json::json!({}));
        assert!(matches!(err, Err(CodecError::Invalid(m)) if m.contains("missing field `amount`")));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = decode_variant::<Command>("deposit", serde_json::json!({"amount": 1, "x": 2}));
        assert!(matches!(err, Err(CodecError::Invalid(m)) if m.contains("unknown field `x`")));
    }

    #[test]
    fn variant_names_lists_the_wire_names() {
        assert_eq!(variant_names::<Command>(), ["deposit", "close", "ping"]);
        assert!(variant_names::<u64>().is_empty());
    }

    #[test]
    fn a_non_enum_cannot_be_encoded_as_a_variant() {
        assert!(matches!(
            encode_variant(&5u64),
            Err(CodecError::NotAnEnum(_))
        ));
    }
}
