//! The fast path of [`super::parse`]: the body read straight into fields that
//! borrow from it, then checked against the same rules as the reference path
//! ([`super::parse_value`]). The only allocations are the event's own strings
//! (and a string with JSON escapes in it, which cannot be borrowed).
//!
//! It may decline a body the reference path would accept (a repeated key
//! whose earlier value is neither a string nor a u64, an `assigned_by.openid`
//! that is not a string): declining only costs time. It must never accept a body the
//! reference path would reject, or build a different event. Hence:
//! - every value goes through `deserialize_any`, `deserialize_str`,
//!   `deserialize_option` or `deserialize_map`, which share the reference
//!   path's parser: the same number range checks, the same `\u` surrogate
//!   checks, the same nesting limit. Unknown fields are walked by [`Checked`],
//!   never skipped with `serde::de::IgnoredAny` (serde_json skips those
//!   without any of these checks, so `1e400` or 200 nested arrays would pass);
//! - objects are read with `deserialize_map`, which takes only `{...}` (a
//!   derived struct would also take an array of its fields);
//! - a repeated key overwrites, as `serde_json::Map` keeps the last value;
//! - `null` reads as absent (`Option`), as in the reference path.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{
    batch_size, has_chars, source_named, timestamp, AssignmentEvent, Batch, Customer, Person,
    BATCH_ID_MAX_CHARS, CUSTOMER_NAME_MAX_CHARS, EVENT_ID_MAX_CHARS, EVENT_TYPE, ID_MAX_CHARS,
};

/// The event in `body`, or `None` when anything about it is not plainly valid
/// (the caller then asks the reference path, which words the rejection).
/// Bytes, not `&str`: a body serde_json reads whole is valid UTF-8.
pub(super) fn parse(body: &[u8]) -> Option<AssignmentEvent> {
    serde_json::from_slice::<RawEvent>(body).ok()?.validate()
}

/// The fields of the top-level object this service reads; `None` is absent or `null`.
#[derive(Default)]
struct RawEvent<'a> {
    event_id: Option<Scalar<'a>>,
    event_type: Option<Scalar<'a>>,
    occurred_at: Option<Scalar<'a>>,
    source: Option<Scalar<'a>>,
    assignee: Option<RawPerson<'a>>,
    customer: Option<RawCustomer<'a>>,
    assigned_by: Option<RawPerson<'a>>,
    batch: Option<RawBatch<'a>>,
}

/// `assignee` and `assigned_by` (whose `openid` is read but not used).
#[derive(Default)]
struct RawPerson<'a> {
    user_id: Option<Scalar<'a>>,
    name: Option<Scalar<'a>>,
    openid: Option<Scalar<'a>>,
}

#[derive(Default)]
struct RawCustomer<'a> {
    id: Option<Scalar<'a>>,
    name: Option<Scalar<'a>>,
}

#[derive(Default)]
struct RawBatch<'a> {
    id: Option<Scalar<'a>>,
    size: Option<Scalar<'a>>,
}

impl RawEvent<'_> {
    /// The same rules as the reference path, in any order: all that matters
    /// here is whether every one of them holds.
    fn validate(self) -> Option<AssignmentEvent> {
        if text_ref(&self.event_type)? != EVENT_TYPE {
            return None;
        }
        let occurred_at = timestamp(text_ref(&self.occurred_at)?)?;
        let source = source_named(text_ref(&self.source)?)?;
        let customer = self.customer?;
        let batch = match self.batch {
            None => None,
            Some(b) => Some(Batch {
                id: text(b.id, BATCH_ID_MAX_CHARS)?,
                size: match b.size? {
                    Scalar::Int(n) => batch_size(n)?,
                    Scalar::Text(_) => return None,
                },
            }),
        };
        Some(AssignmentEvent {
            event_id: text(self.event_id, EVENT_ID_MAX_CHARS)?,
            occurred_at,
            source,
            assignee: self.assignee?.person(true)?,
            customer: Customer {
                id: id(customer.id)?,
                name: text(customer.name, CUSTOMER_NAME_MAX_CHARS)?,
            },
            assigned_by: match self.assigned_by {
                None => None,
                Some(p) => Some(p.person(false)?),
            },
            batch,
        })
    }
}

impl RawPerson<'_> {
    fn person(self, with_openid: bool) -> Option<Person> {
        Some(Person {
            user_id: id(self.user_id)?,
            name: optional_text(self.name)?,
            openid: if with_openid {
                optional_text(self.openid)?
            } else {
                None
            },
        })
    }
}

/// A required string of 1..=`max` characters.
fn text(value: Option<Scalar>, max: usize) -> Option<String> {
    match value? {
        Scalar::Text(s) if has_chars(&s, max) => Some(s.into_owned()),
        _ => None,
    }
}

/// A required string, borrowed for a comparison.
fn text_ref<'v>(value: &'v Option<Scalar>) -> Option<&'v str> {
    match value.as_ref()? {
        Scalar::Text(s) => Some(s),
        Scalar::Int(_) => None,
    }
}

/// An optional string: `Some(None)` when absent, `None` when not a string.
fn optional_text(value: Option<Scalar>) -> Option<Option<String>> {
    match value {
        None => Some(None),
        Some(Scalar::Text(s)) => Some(Some(s.into_owned())),
        Some(Scalar::Int(_)) => None,
    }
}

/// `user_id`, `customer.id`: a string of 1..64 characters, or a u64 taken as
/// its decimal string (what `serde_json::Number`'s `to_string` gives).
fn id(value: Option<Scalar>) -> Option<String> {
    match value? {
        Scalar::Text(s) if has_chars(&s, ID_MAX_CHARS) => Some(s.into_owned()),
        Scalar::Text(_) => None,
        Scalar::Int(n) => Some(n.to_string()),
    }
}

/// A JSON string (borrowed unless it has escapes) or a non-negative integer
/// that fits in a u64. Any other value fails deserialization, which declines
/// the body.
enum Scalar<'a> {
    Text(Cow<'a, str>),
    Int(u64),
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a non-negative integer")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Text(Cow::Owned(s.to_owned())))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Int(n))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// An object key, borrowed unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Any JSON value, read in full and dropped: the value of a field this
/// service does not know. Read with `deserialize_any` (as a `Value` is), so
/// it fails exactly where building a `Value` would.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CheckedVisitor;
        impl<'de> Visitor<'de> for CheckedVisitor {
            type Value = Checked;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_unit<E>(self) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Checked)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
                while map.next_entry::<Key, Checked>()?.is_some() {}
                Ok(Checked)
            }
        }
        deserializer.deserialize_any(CheckedVisitor)
    }
}

/// A JSON object read field by field: each type says which keys it takes;
/// every other key's value is walked by [`Checked`].
trait Fields<'de>: Default {
    /// Reads the value of `key` into `self` when the key is one of ours
    /// (a repeated key overwrites); `false` for a key this type does not know.
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;
}

/// Reads a `T` from a JSON object, and from nothing else.
fn object<'de, T: Fields<'de>, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
    struct ObjectVisitor<T>(PhantomData<T>);
    impl<'de, T: Fields<'de>> Visitor<'de> for ObjectVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
            let mut fields = T::default();
            while let Some(Key(key)) = map.next_key::<Key>()? {
                if !fields.read(&key, &mut map)? {
                    map.next_value::<Checked>()?;
                }
            }
            Ok(fields)
        }
    }
    deserializer.deserialize_map(ObjectVisitor(PhantomData))
}

impl<'de> Fields<'de> for RawEvent<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "event_id" => self.event_id = map.next_value()?,
            "event_type" => self.event_type = map.next_value()?,
            "occurred_at" => self.occurred_at = map.next_value()?,
            "source" => self.source = map.next_value()?,
            "assignee" => self.assignee = map.next_value()?,
            "customer" => self.customer = map.next_value()?,
            "assigned_by" => self.assigned_by = map.next_value()?,
            "batch" => self.batch = map.next_value()?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl<'de> Fields<'de> for RawPerson<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "user_id" => self.user_id = map.next_value()?,
            "name" => self.name = map.next_value()?,
            "openid" => self.openid = map.next_value()?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl<'de> Fields<'de> for RawCustomer<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "id" => self.id = map.next_value()?,
            "name" => self.name = map.next_value()?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl<'de> Fields<'de> for RawBatch<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "id" => self.id = map.next_value()?,
            "size" => self.size = map.next_value()?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Each object type is read with [`object`].
macro_rules! deserialize_as_object {
    ($($t:ident),*) => {$(
        impl<'de> Deserialize<'de> for $t<'de> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                object(deserializer)
            }
        }
    )*};
}
deserialize_as_object!(RawEvent, RawPerson, RawCustomer, RawBatch);
