//! Reading the configuration document field by field, so every error names its field's path.
//!
//! The document is parsed once into a `serde_json::Value` tree (refusing duplicate keys) and then
//! taken apart field by field, so every error names the dotted path of its field
//! (`exchange.timeout_ms`, `routes[0].tools.read.exchange_scope`) and serde's own message says
//! what is wrong with it. `#[derive(Deserialize)]` on the structs plus the `serde_path_to_error`
//! crate did the same, but through a generic wrapper around every visitor and deserializer
//! method: ~50 KB of a module that must stay under 600 KiB. Only leaf values (strings, numbers,
//! enums) still go through serde, one `serde_json::from_value` each.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Number, Value};

use crate::config::ConfigError;

/// `parent.name`, or `name` at the top level.
pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// A leaf value as a `T`, with serde's message (`invalid type: string "soon", expected u64`).
pub(crate) fn value<T: DeserializeOwned>(path: &str, v: Value) -> Result<T, ConfigError> {
    serde_json::from_value(v).map_err(|e| ConfigError::new(path, e.to_string()))
}

/// The object at `path`, or serde's "invalid type …, expected a map" error.
pub(crate) fn object(path: &str, v: Value) -> Result<Map<String, Value>, ConfigError> {
    match v {
        Value::Object(map) => Ok(map),
        other => value(path, other),
    }
}

/// The array at `path`, or serde's "invalid type …, expected a sequence" error.
pub(crate) fn list(path: &str, v: Value) -> Result<Vec<Value>, ConfigError> {
    match v {
        Value::Array(items) => Ok(items),
        other => value(path, other),
    }
}

/// A list of strings; a bad element is named by its index (`audiences[1]`).
pub(crate) fn strings(path: &str, v: Value) -> Result<Vec<String>, ConfigError> {
    list(path, v)?
        .into_iter()
        .enumerate()
        .map(|(i, item)| value(&format!("{path}[{i}]"), item))
        .collect()
}

/// One JSON object of the configuration, read field by field: each getter removes its field,
/// with serde's semantics for `#[serde(default)]` and `Option` fields.
pub(crate) struct Fields {
    path: String,
    map: Map<String, Value>,
}

impl Fields {
    /// Refuses the object if it has a key outside `known` (`deny_unknown_fields`), before any
    /// value is looked at, so a misspelt field is reported as such.
    pub(crate) fn new(
        path: String,
        v: Value,
        known: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        let map = object(&path, v)?;
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let message = <serde_json::Error as de::Error>::unknown_field(key, known);
            return Err(ConfigError::new(&join(&path, key), message.to_string()));
        }
        Ok(Self { path, map })
    }

    pub(crate) fn path(&self, name: &str) -> String {
        join(&self.path, name)
    }

    /// The raw value of a required field, with its path. Missing, it is reported at the
    /// object's path, as serde does.
    pub(crate) fn take_required(&mut self, name: &str) -> Result<(String, Value), ConfigError> {
        self.take(name)
            .ok_or_else(|| ConfigError::new(&self.path, format!("missing field `{name}`")))
    }

    pub(crate) fn required<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, ConfigError> {
        let (path, v) = self.take_required(name)?;
        value(&path, v)
    }

    /// A field with a default: absent → `default()`; present, even as `null`, it must be a `T`.
    pub(crate) fn or_else<T: DeserializeOwned>(
        &mut self,
        name: &str,
        default: impl FnOnce() -> T,
    ) -> Result<T, ConfigError> {
        match self.map.remove(name) {
            Some(v) => value(&self.path(name), v),
            None => Ok(default()),
        }
    }

    pub(crate) fn or_default<T: DeserializeOwned + Default>(
        &mut self,
        name: &str,
    ) -> Result<T, ConfigError> {
        self.or_else(name, T::default)
    }

    /// An `Option` field: absent or `null` → `None`.
    pub(crate) fn optional<T: DeserializeOwned>(
        &mut self,
        name: &str,
    ) -> Result<Option<T>, ConfigError> {
        self.or_default::<Option<T>>(name)
    }

    /// The raw value of a field whose parts are read with their own paths; `None` when absent.
    pub(crate) fn take(&mut self, name: &str) -> Option<(String, Value)> {
        self.map.remove(name).map(|v| (self.path(name), v))
    }

    /// A list of strings, absent → empty.
    pub(crate) fn strings(&mut self, name: &str) -> Result<Vec<String>, ConfigError> {
        self.take(name)
            .map_or(Ok(Vec::new()), |(path, v)| strings(&path, v))
    }

    /// An optional list of strings: absent or `null` → `None`.
    pub(crate) fn optional_strings(
        &mut self,
        name: &str,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        match self.take(name) {
            None | Some((_, Value::Null)) => Ok(None),
            Some((path, v)) => strings(&path, v).map(Some),
        }
    }

    /// An object of `T`s keyed by name, each read with its own path (`tools.read`); absent →
    /// empty.
    pub(crate) fn named<T>(
        &mut self,
        name: &str,
        read: impl Fn(String, Value) -> Result<T, ConfigError>,
    ) -> Result<BTreeMap<String, T>, ConfigError> {
        let Some((path, v)) = self.take(name) else {
            return Ok(BTreeMap::new());
        };
        object(&path, v)?
            .into_iter()
            .map(|(key, v)| {
                let item = read(join(&path, &key), v)?;
                Ok((key, item))
            })
            .collect()
    }
}

/// A JSON value that refuses duplicate keys in every object. serde_json's own `Value` silently
/// keeps the last of two equal keys; `{"issuer": "a", "issuer": "b"}` is an error instead, as
/// it was when the typed structs were deserialized directly (serde's `duplicate field`).
pub(crate) struct UniqueKeys(pub(crate) Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueKeysVisitor)
            .map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity, so this is always a number; `Null` mirrors serde_json.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
            let UniqueKeys(v) = access.next_value()?;
            map.insert(key, v);
        }
        Ok(Value::Object(map))
    }
}
