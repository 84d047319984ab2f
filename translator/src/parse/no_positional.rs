//! Typed decoding from a JSON value that refuses a sequence where a struct is read. serde's
//! derived structs also read a sequence (positionally), so `workloadSelector: []` would pass as
//! a selector of no labels, selecting every workload; Kubernetes refuses it, and so does sluice.
//! Everything else is `&serde_json::Value`'s own decoding.

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, Deserializer, IntoDeserializer, Visitor};
use serde_json::{Error, Value};

/// The message of the refusal; the path comes from the caller's error path.
const SEQUENCE_FOR_MAPPING: &str = "expected a mapping, found a sequence";

/// A value to decode, with its collections decoded through [`NoPositional`] too.
#[derive(Clone, Copy)]
pub struct NoPositional<'a>(pub &'a Value);

/// `deserialize_<scalar>` for [`NoPositional`]: `&Value`'s own.
macro_rules! to_value {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.0.$method(visitor)
        }
    )*};
}

impl<'de> Deserializer<'de> for NoPositional<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            // As serde_json: what the visitor left unread is an error, not dropped.
            Value::Array(items) => {
                let mut rest = Items(items.iter());
                let out = visitor.visit_seq(&mut rest)?;
                match rest.0.len() {
                    0 => Ok(out),
                    _ => Err(de::Error::invalid_length(items.len(), &"fewer elements in array")),
                }
            }
            Value::Object(map) => {
                let mut rest = Entries { entries: map.iter(), value: None };
                let out = visitor.visit_map(&mut rest)?;
                match rest.entries.len() {
                    0 => Ok(out),
                    _ => Err(de::Error::invalid_length(map.len(), &"fewer elements in map")),
                }
            }
            Value::String(s) => visitor.visit_borrowed_str(s),
            scalar => scalar.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::Array(_) => Err(de::Error::custom(SEQUENCE_FOR_MAPPING)),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(BorrowedStrDeserializer::new(s)),
            Value::Object(map) if map.len() == 1 => {
                let (variant, content) = map.iter().next().expect("one entry");
                visitor.visit_enum(Variant { variant, content })
            }
            other => Err(de::Error::invalid_type(unexpected(other), &"a string or a mapping of one key")),
        }
    }

    // Scalars as `&Value` reads them (numbers by width, strings borrowed); a collection asked for
    // as a scalar fails there with its type named.
    to_value! { deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_f32 deserialize_f64 deserialize_char deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf deserialize_unit }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, Error> {
        self.0.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! { seq tuple tuple_struct map identifier }
}

/// What `value` is, for an error message.
fn unexpected(value: &Value) -> de::Unexpected<'_> {
    match value {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => n.as_f64().map_or(de::Unexpected::Other("number"), de::Unexpected::Float),
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

struct Items<'a>(std::slice::Iter<'a, Value>);

impl<'de> de::SeqAccess<'de> for Items<'de> {
    type Error = Error;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        self.0.next().map(|v| seed.deserialize(NoPositional(v))).transpose()
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Entries<'a> {
    entries: serde_json::map::Iter<'a>,
    value: Option<&'a Value>,
}

impl<'de> de::MapAccess<'de> for Entries<'de> {
    type Error = Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.entries.next() else { return Ok(None) };
        self.value = Some(value);
        seed.deserialize(Key(key)).map(Some)
    }
    fn next_value_seed<V: de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let value = self.value.take().ok_or_else(|| de::Error::custom("a value asked for before its key"))?;
        seed.deserialize(NoPositional(value))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// A mapping's key. JSON keys are strings; a map keyed by numbers (`portLevelMtls: {"80": …}`)
/// reads them from the string, as `serde_json` does.
struct Key<'a>(&'a str);

/// `deserialize_<int>` for [`Key`]: the key's text as that integer.
macro_rules! integer_key {
    ($($method:ident $visit:ident $int:ty),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.0.parse::<$int>() {
                Ok(n) => visitor.$visit(n),
                Err(_) => Err(de::Error::custom(format!("expected key to be a number, found {:?}", self.0))),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Key<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_str(self.0)
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_enum(BorrowedStrDeserializer::new(self.0))
    }

    integer_key! {
        deserialize_i8 visit_i8 i8, deserialize_i16 visit_i16 i16, deserialize_i32 visit_i32 i32,
        deserialize_i64 visit_i64 i64, deserialize_u8 visit_u8 u8, deserialize_u16 visit_u16 u16,
        deserialize_u32 visit_u32 u32, deserialize_u64 visit_u64 u64
    }

    serde::forward_to_deserialize_any! {
        bool i128 u128 f32 f64 char str string bytes byte_buf unit unit_struct seq tuple tuple_struct map
        struct identifier ignored_any
    }
}

/// An enum written as a mapping of one key: the variant and its content.
struct Variant<'a> {
    variant: &'a String,
    content: &'a Value,
}

impl<'de> de::EnumAccess<'de> for Variant<'de> {
    type Error = Error;
    type Variant = NoPositional<'de>;

    fn variant_seed<S: de::DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self::Variant), Error> {
        let variant = seed.deserialize(self.variant.as_str().into_deserializer())?;
        Ok((variant, NoPositional(self.content)))
    }
}

impl<'de> de::VariantAccess<'de> for NoPositional<'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        de::Deserialize::deserialize(self)
    }
    fn newtype_variant_seed<T: de::DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }
    fn struct_variant<V: Visitor<'de>>(self, _: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        self.deserialize_struct("", &[], visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(default)]
    struct Selector {
        match_labels: std::collections::BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Outer {
        selector: Option<Selector>,
        list: Vec<Selector>,
        port: u16,
    }

    fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
        T::deserialize(NoPositional(&v)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_sequence_where_a_struct_is_read_is_refused_at_any_depth() {
        let ok = serde_json::json!({"selector": {"match_labels": {"a": "b"}}, "list": [{}], "port": 80});
        let outer: Outer = decode(ok).unwrap();
        assert_eq!(outer.selector.unwrap().match_labels["a"], "b");
        // serde_json's own decoding takes each of these as a struct read positionally.
        for bad in [
            serde_json::json!({"selector": [], "list": [], "port": 80}),
            serde_json::json!({"list": [[{"a": "b"}]], "port": 80}),
        ] {
            assert!(Outer::deserialize(&bad).is_ok(), "{bad}: serde_json reads it");
            assert_eq!(decode::<Outer>(bad).unwrap_err(), SEQUENCE_FOR_MAPPING);
        }
    }

    #[test]
    fn elements_left_unread_are_an_error() {
        let err = decode::<(u8, u8)>(serde_json::json!([1, 2, 3])).unwrap_err();
        assert_eq!(err, <(u8, u8)>::deserialize(&serde_json::json!([1, 2, 3])).unwrap_err().to_string());
    }

    #[test]
    fn numeric_keys_are_read_from_their_text() {
        let ports: std::collections::BTreeMap<u32, String> =
            decode(serde_json::json!({"80": "a", "9080": "b"})).unwrap();
        assert_eq!(ports[&9080], "b");
        let err = decode::<std::collections::BTreeMap<u16, String>>(serde_json::json!({"http": "a"})).unwrap_err();
        assert_eq!(err, "expected key to be a number, found \"http\"");
    }

    #[test]
    fn scalars_decode_as_serde_json_decodes_them() {
        let err = decode::<Outer>(serde_json::json!({"list": [], "port": 70000})).unwrap_err();
        let theirs = Outer::deserialize(&serde_json::json!({"list": [], "port": 70000})).unwrap_err();
        assert_eq!(err, theirs.to_string());
        let err = decode::<Outer>(serde_json::json!({"list": {}, "port": 1})).unwrap_err();
        assert!(err.contains("invalid type: map"), "{err}");
        assert!(decode::<Selector>(serde_json::json!("x")).unwrap_err().contains("invalid type: string"));
    }
}
