//! AMF0 values: decode and encode, with depth and size limits.
//!
//! Decoding never trusts a declared length or count: each is checked against the
//! configured limit and against the bytes actually left before anything is allocated,
//! and the nesting depth is checked before recursing, so 70,000 nested arrays end in an
//! error at `max_depth` instead of a stack overflow.
//!
//! Strings are decoded lossily as UTF-8 (invalid sequences become U+FFFD): RTMP peers
//! send names and URLs, and a replaced byte is more useful than a refused connect.

use bytes::{BufMut, Bytes, BytesMut};

pub use crate::amf::{AmfError, AmfLimits, HARD_MAX_DEPTH};
use crate::amf::{Budget, Reader};
use crate::amf3::{self, Amf3Value};

/// AMF0 type markers (AMF0 specification, section 2.1).
pub mod marker {
    pub const NUMBER: u8 = 0x00;
    pub const BOOLEAN: u8 = 0x01;
    pub const STRING: u8 = 0x02;
    pub const OBJECT: u8 = 0x03;
    pub const MOVIECLIP: u8 = 0x04;
    pub const NULL: u8 = 0x05;
    pub const UNDEFINED: u8 = 0x06;
    pub const REFERENCE: u8 = 0x07;
    pub const ECMA_ARRAY: u8 = 0x08;
    pub const OBJECT_END: u8 = 0x09;
    pub const STRICT_ARRAY: u8 = 0x0A;
    pub const DATE: u8 = 0x0B;
    pub const LONG_STRING: u8 = 0x0C;
    pub const UNSUPPORTED: u8 = 0x0D;
    pub const RECORDSET: u8 = 0x0E;
    pub const XML_DOCUMENT: u8 = 0x0F;
    pub const TYPED_OBJECT: u8 = 0x10;
    pub const AVMPLUS: u8 = 0x11;
}

/// One AMF0 value.
#[derive(Clone, Debug, PartialEq)]
pub enum Amf0Value {
    Number(f64),
    Boolean(bool),
    String(String),
    Object(Vec<(String, Amf0Value)>),
    Null,
    Undefined,
    /// Index into the complex values (objects, arrays) decoded earlier in the payload.
    /// Kept unresolved: resolving would let a few bytes copy a large object many times.
    Reference(u16),
    EcmaArray(Vec<(String, Amf0Value)>),
    StrictArray(Vec<Amf0Value>),
    Date {
        millis: f64,
        tz: i16,
    },
    LongString(String),
    /// The "unsupported" marker (0x0D).
    Unsupported,
    XmlDocument(String),
    TypedObject {
        class: String,
        props: Vec<(String, Amf0Value)>,
    },
    /// A value after the AVM+ switch marker (0x11).
    Amf3(Amf3Value),
}

struct Decoder<'a, 'l> {
    r: Reader<'a>,
    budget: Budget<'l>,
    /// Complex values seen so far: the AMF0 reference table, counted not stored.
    complex: usize,
}

/// Decodes every value in `buf` (a command or data message body).
pub fn decode_all(buf: &[u8], limits: &AmfLimits) -> Result<Vec<Amf0Value>, AmfError> {
    let mut d = Decoder {
        r: Reader::new(buf),
        budget: Budget::new(limits),
        complex: 0,
    };
    let mut out = Vec::new();
    while !d.r.is_empty() {
        out.push(d.value(0)?);
    }
    Ok(out)
}

/// Decodes one value from the front of `buf`; returns it and the bytes it used.
pub fn decode_one(buf: &[u8], limits: &AmfLimits) -> Result<(Amf0Value, usize), AmfError> {
    let mut d = Decoder {
        r: Reader::new(buf),
        budget: Budget::new(limits),
        complex: 0,
    };
    let v = d.value(0)?;
    Ok((v, d.r.pos()))
}

impl Decoder<'_, '_> {
    fn value(&mut self, depth: usize) -> Result<Amf0Value, AmfError> {
        self.budget.entry()?;
        let at = self.r.pos();
        let m = self.r.u8()?;
        Ok(match m {
            marker::NUMBER => Amf0Value::Number(self.r.f64()?),
            marker::BOOLEAN => Amf0Value::Boolean(self.r.u8()? != 0),
            marker::STRING => {
                let len = usize::from(self.r.u16()?);
                Amf0Value::String(self.budget.string(&mut self.r, len)?)
            }
            marker::LONG_STRING => {
                let len = self.r.u32()? as usize;
                Amf0Value::LongString(self.budget.string(&mut self.r, len)?)
            }
            marker::XML_DOCUMENT => {
                let len = self.r.u32()? as usize;
                Amf0Value::XmlDocument(self.budget.string(&mut self.r, len)?)
            }
            marker::NULL => Amf0Value::Null,
            marker::UNDEFINED => Amf0Value::Undefined,
            marker::UNSUPPORTED => Amf0Value::Unsupported,
            marker::REFERENCE => {
                let index = self.r.u16()?;
                if usize::from(index) >= self.complex {
                    return Err(AmfError::BadReference {
                        version: 0,
                        kind: "object",
                        index: u32::from(index),
                        known: self.complex,
                        at,
                    });
                }
                Amf0Value::Reference(index)
            }
            marker::OBJECT => {
                self.budget.depth(depth, at)?;
                self.complex = self.complex.saturating_add(1);
                Amf0Value::Object(self.props(depth)?)
            }
            marker::ECMA_ARRAY => {
                self.budget.depth(depth, at)?;
                self.complex = self.complex.saturating_add(1);
                // The count is advisory (encoders disagree on it); the end marker decides.
                let _count = self.r.u32()?;
                Amf0Value::EcmaArray(self.props(depth)?)
            }
            marker::TYPED_OBJECT => {
                self.budget.depth(depth, at)?;
                self.complex = self.complex.saturating_add(1);
                let len = usize::from(self.r.u16()?);
                let class = self.budget.string(&mut self.r, len)?;
                Amf0Value::TypedObject {
                    class,
                    props: self.props(depth)?,
                }
            }
            marker::STRICT_ARRAY => {
                self.budget.depth(depth, at)?;
                self.complex = self.complex.saturating_add(1);
                let count = self.r.u32()? as usize;
                let reserve = self.budget.count(&self.r, count, 1)?;
                let mut items = Vec::with_capacity(reserve);
                for _ in 0..count {
                    items.push(self.value(depth + 1)?);
                }
                Amf0Value::StrictArray(items)
            }
            marker::DATE => {
                let millis = self.r.f64()?;
                let tz = i16::from_be_bytes(self.r.array()?);
                Amf0Value::Date { millis, tz }
            }
            marker::AVMPLUS => {
                self.budget.depth(depth, at)?;
                Amf0Value::Amf3(amf3::decode_in(&mut self.r, &mut self.budget, depth + 1)?)
            }
            _ => {
                return Err(AmfError::UnknownMarker {
                    version: 0,
                    marker: m,
                    at,
                })
            }
        })
    }

    /// Key/value pairs up to the empty key and object-end marker.
    fn props(&mut self, depth: usize) -> Result<Vec<(String, Amf0Value)>, AmfError> {
        let mut props = Vec::new();
        loop {
            let at = self.r.pos();
            let len = usize::from(self.r.u16()?);
            if len == 0 {
                if self.r.u8()? != marker::OBJECT_END {
                    return Err(AmfError::MissingObjectEnd { at });
                }
                return Ok(props);
            }
            let key = self.budget.string(&mut self.r, len)?;
            let v = self.value(depth + 1)?;
            props.push((key, v));
        }
    }
}

/// Writes a UTF-8 string with a 16-bit length. Longer strings are cut at 65,535 bytes:
/// AMF0 has no way to express them in this position (keys, class names).
fn put_str16(out: &mut BytesMut, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(usize::from(u16::MAX));
    out.put_u16(n as u16);
    out.extend_from_slice(&b[..n]);
}

fn put_str32(out: &mut BytesMut, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u32::MAX as usize);
    out.put_u32(n as u32);
    out.extend_from_slice(&b[..n]);
}

fn put_props(out: &mut BytesMut, props: &[(String, Amf0Value)]) {
    for (k, v) in props {
        if k.is_empty() {
            // An empty key would read back as the end of the object.
            continue;
        }
        put_str16(out, k);
        v.encode(out);
    }
    out.extend_from_slice(&[0, 0, marker::OBJECT_END]);
}

impl Amf0Value {
    /// Appends the AMF0 encoding. A `String` longer than 65,535 bytes is written as a
    /// long string, since the short form cannot hold it.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Amf0Value::Number(n) => {
                out.put_u8(marker::NUMBER);
                out.put_f64(*n);
            }
            Amf0Value::Boolean(b) => {
                out.put_u8(marker::BOOLEAN);
                out.put_u8(u8::from(*b));
            }
            Amf0Value::String(s) if s.len() <= usize::from(u16::MAX) => {
                out.put_u8(marker::STRING);
                put_str16(out, s);
            }
            Amf0Value::String(s) | Amf0Value::LongString(s) => {
                out.put_u8(marker::LONG_STRING);
                put_str32(out, s);
            }
            Amf0Value::XmlDocument(s) => {
                out.put_u8(marker::XML_DOCUMENT);
                put_str32(out, s);
            }
            Amf0Value::Object(props) => {
                out.put_u8(marker::OBJECT);
                put_props(out, props);
            }
            Amf0Value::Null => out.put_u8(marker::NULL),
            Amf0Value::Undefined => out.put_u8(marker::UNDEFINED),
            Amf0Value::Unsupported => out.put_u8(marker::UNSUPPORTED),
            Amf0Value::Reference(i) => {
                out.put_u8(marker::REFERENCE);
                out.put_u16(*i);
            }
            Amf0Value::EcmaArray(props) => {
                out.put_u8(marker::ECMA_ARRAY);
                out.put_u32(u32::try_from(props.len()).unwrap_or(u32::MAX));
                put_props(out, props);
            }
            Amf0Value::StrictArray(items) => {
                out.put_u8(marker::STRICT_ARRAY);
                let n = items.len().min(u32::MAX as usize);
                out.put_u32(n as u32);
                for v in &items[..n] {
                    v.encode(out);
                }
            }
            Amf0Value::Date { millis, tz } => {
                out.put_u8(marker::DATE);
                out.put_f64(*millis);
                out.put_i16(*tz);
            }
            Amf0Value::TypedObject { class, props } => {
                out.put_u8(marker::TYPED_OBJECT);
                put_str16(out, class);
                put_props(out, props);
            }
            Amf0Value::Amf3(v) => {
                out.put_u8(marker::AVMPLUS);
                v.encode(out);
            }
        }
    }

    /// The text of a string value (short, long, or an AMF3 string behind the switch).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Amf0Value::String(s) | Amf0Value::LongString(s) => Some(s),
            Amf0Value::Amf3(Amf3Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The value of a number (or an AMF3 integer or double behind the switch).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Amf0Value::Number(n) => Some(*n),
            Amf0Value::Amf3(Amf3Value::Double(n)) => Some(*n),
            Amf0Value::Amf3(Amf3Value::Integer(n)) => Some(f64::from(*n)),
            _ => None,
        }
    }

    /// A boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Amf0Value::Boolean(b) => Some(*b),
            Amf0Value::Amf3(Amf3Value::Boolean(b)) => Some(*b),
            _ => None,
        }
    }

    /// The properties of an object, ECMA array or typed object.
    pub fn props(&self) -> Option<&[(String, Amf0Value)]> {
        match self {
            Amf0Value::Object(p) | Amf0Value::EcmaArray(p) => Some(p),
            Amf0Value::TypedObject { props, .. } => Some(props),
            _ => None,
        }
    }

    /// The first property named `key` of an object, ECMA array or typed object.
    pub fn get(&self, key: &str) -> Option<&Amf0Value> {
        self.props()?.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Builds an anonymous object from `(key, value)` pairs, in order.
    pub fn object<'k, I: IntoIterator<Item = (&'k str, Amf0Value)>>(i: I) -> Self {
        Amf0Value::Object(i.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// Shorthand for a short string value.
    pub fn string(s: impl Into<String>) -> Self {
        Amf0Value::String(s.into())
    }
}

impl Amf3Value {
    /// The nearest AMF0 value, so command handling sees one model: numbers, strings,
    /// booleans, dates, arrays and objects convert; the rest stays wrapped in
    /// [`Amf0Value::Amf3`]. A [`Amf3Value::Reference`] loses its meaning once taken out
    /// of its payload: callers that re-encode should check [`Amf3Value::has_reference`].
    pub fn to_amf0(&self) -> Amf0Value {
        let props = |p: &[(String, Amf3Value)]| -> Vec<(String, Amf0Value)> {
            p.iter().map(|(k, v)| (k.clone(), v.to_amf0())).collect()
        };
        match self {
            Amf3Value::Undefined => Amf0Value::Undefined,
            Amf3Value::Null => Amf0Value::Null,
            Amf3Value::Boolean(b) => Amf0Value::Boolean(*b),
            Amf3Value::Integer(i) => Amf0Value::Number(f64::from(*i)),
            Amf3Value::Double(d) => Amf0Value::Number(*d),
            Amf3Value::String(s) => Amf0Value::String(s.clone()),
            Amf3Value::Date(ms) => Amf0Value::Date { millis: *ms, tz: 0 },
            Amf3Value::Array { assoc, dense } if assoc.is_empty() => {
                Amf0Value::StrictArray(dense.iter().map(Amf3Value::to_amf0).collect())
            }
            Amf3Value::Array { assoc, dense } => {
                let mut p = props(assoc);
                p.extend(
                    dense
                        .iter()
                        .enumerate()
                        .map(|(i, v)| (i.to_string(), v.to_amf0())),
                );
                Amf0Value::EcmaArray(p)
            }
            Amf3Value::Object(o) => {
                let mut p = props(&o.sealed);
                p.extend(props(&o.dynamic_props));
                if o.class_name.is_empty() {
                    Amf0Value::Object(p)
                } else {
                    Amf0Value::TypedObject {
                        class: o.class_name.clone(),
                        props: p,
                    }
                }
            }
            Amf3Value::External { value, .. } => value.to_amf0(),
            other => Amf0Value::Amf3(other.clone()),
        }
    }
}

/// Encodes values one after another (a command or data message body).
pub fn encode_all(values: &[Amf0Value]) -> Bytes {
    let mut out = BytesMut::with_capacity(128);
    for v in values {
        v.encode(&mut out);
    }
    out.freeze()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Captured from ffmpeg 5.1 (publishing) talking to nginx-rtmp.
    pub(crate) const FFMPEG_PUBLISH_CONNECT: &[u8] = &[
        0x02, 0x00, 0x07, 0x63, 0x6f, 0x6e, 0x6e, 0x65, 0x63, 0x74, 0x00, 0x3f, 0xf0, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x03, 0x61, 0x70, 0x70, 0x02, 0x00, 0x04, 0x6c, 0x69,
        0x76, 0x65, 0x00, 0x04, 0x74, 0x79, 0x70, 0x65, 0x02, 0x00, 0x0a, 0x6e, 0x6f, 0x6e, 0x70,
        0x72, 0x69, 0x76, 0x61, 0x74, 0x65, 0x00, 0x08, 0x66, 0x6c, 0x61, 0x73, 0x68, 0x56, 0x65,
        0x72, 0x02, 0x00, 0x24, 0x46, 0x4d, 0x4c, 0x45, 0x2f, 0x33, 0x2e, 0x30, 0x20, 0x28, 0x63,
        0x6f, 0x6d, 0x70, 0x61, 0x74, 0x69, 0x62, 0x6c, 0x65, 0x3b, 0x20, 0x4c, 0x61, 0x76, 0x66,
        0x35, 0x39, 0x2e, 0x32, 0x37, 0x2e, 0x31, 0x30, 0x30, 0x29, 0x00, 0x05, 0x74, 0x63, 0x55,
        0x72, 0x6c, 0x02, 0x00, 0x1b, 0x72, 0x74, 0x6d, 0x70, 0x3a, 0x2f, 0x2f, 0x31, 0x32, 0x37,
        0x2e, 0x30, 0x2e, 0x30, 0x2e, 0x31, 0x3a, 0x33, 0x36, 0x36, 0x34, 0x31, 0x2f, 0x6c, 0x69,
        0x76, 0x65, 0x00, 0x00, 0x09,
    ];
    /// Captured from ffmpeg 5.1 (playing) talking to nginx-rtmp.
    pub(crate) const FFMPEG_PLAY_CONNECT: &[u8] = &[
        0x02, 0x00, 0x07, 0x63, 0x6f, 0x6e, 0x6e, 0x65, 0x63, 0x74, 0x00, 0x3f, 0xf0, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x03, 0x61, 0x70, 0x70, 0x02, 0x00, 0x04, 0x6c, 0x69,
        0x76, 0x65, 0x00, 0x08, 0x66, 0x6c, 0x61, 0x73, 0x68, 0x56, 0x65, 0x72, 0x02, 0x00, 0x0d,
        0x4c, 0x4e, 0x58, 0x20, 0x39, 0x2c, 0x30, 0x2c, 0x31, 0x32, 0x34, 0x2c, 0x32, 0x00, 0x05,
        0x74, 0x63, 0x55, 0x72, 0x6c, 0x02, 0x00, 0x1b, 0x72, 0x74, 0x6d, 0x70, 0x3a, 0x2f, 0x2f,
        0x31, 0x32, 0x37, 0x2e, 0x30, 0x2e, 0x30, 0x2e, 0x31, 0x3a, 0x33, 0x36, 0x36, 0x34, 0x31,
        0x2f, 0x6c, 0x69, 0x76, 0x65, 0x00, 0x04, 0x66, 0x70, 0x61, 0x64, 0x01, 0x00, 0x00, 0x0c,
        0x63, 0x61, 0x70, 0x61, 0x62, 0x69, 0x6c, 0x69, 0x74, 0x69, 0x65, 0x73, 0x00, 0x40, 0x2e,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x61, 0x75, 0x64, 0x69, 0x6f, 0x43, 0x6f,
        0x64, 0x65, 0x63, 0x73, 0x00, 0x40, 0xaf, 0xce, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0b,
        0x76, 0x69, 0x64, 0x65, 0x6f, 0x43, 0x6f, 0x64, 0x65, 0x63, 0x73, 0x00, 0x40, 0x6f, 0x80,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0d, 0x76, 0x69, 0x64, 0x65, 0x6f, 0x46, 0x75, 0x6e,
        0x63, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x3f, 0xf0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x09,
    ];

    /// A connect command built the way ffmpeg's rtmpproto.c gen_connect builds it when
    /// publishing: "connect", transaction 1, then one object.
    pub(crate) fn ffmpeg_connect() -> Vec<u8> {
        let v = [
            Amf0Value::string("connect"),
            Amf0Value::Number(1.0),
            Amf0Value::object([
                ("app", Amf0Value::string("live")),
                ("type", Amf0Value::string("nonprivate")),
                (
                    "flashVer",
                    Amf0Value::string("FMLE/3.0 (compatible; FMSc/1.0)"),
                ),
                ("tcUrl", Amf0Value::string("rtmp://127.0.0.1:1935/live")),
            ]),
        ];
        encode_all(&v).to_vec()
    }

    #[test]
    fn amf3_nesting_behind_the_switch_marker_is_bounded() {
        let mut b = vec![marker::AVMPLUS];
        for _ in 0..70_000 {
            b.extend_from_slice(&[crate::amf3::marker::ARRAY, 0x03, 0x01]);
        }
        assert!(matches!(
            decode_all(&b, &AmfLimits::default()),
            Err(AmfError::TooDeep { .. })
        ));
    }

    #[test]
    fn connect_hand_checked_bytes() {
        let b = ffmpeg_connect();
        // 02 0007 "connect"
        assert_eq!(&b[..10], b"\x02\x00\x07connect");
        // 00 3ff0000000000000 (1.0)
        assert_eq!(&b[10..19], &[0, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0]);
        // 03 0003 "app" 02 0004 "live"
        assert_eq!(&b[19..32], b"\x03\x00\x03app\x02\x00\x04live");
        assert_eq!(&b[b.len() - 3..], &[0, 0, 9]);
        let v = decode_all(&b, &AmfLimits::default()).unwrap();
        assert_eq!(v[0].as_str(), Some("connect"));
        assert_eq!(v[1].as_f64(), Some(1.0));
        assert_eq!(v[2].get("app").and_then(|a| a.as_str()), Some("live"));
        assert_eq!(
            v[2].get("flashVer").and_then(|a| a.as_str()),
            Some("FMLE/3.0 (compatible; FMSc/1.0)")
        );
    }

    #[test]
    fn truncated_connect_at_every_position_is_an_error() {
        let b = ffmpeg_connect();
        let limits = AmfLimits::default();
        for cut in 0..b.len() {
            let r = decode_all(&b[..cut], &limits);
            // Cuts on a value boundary decode fewer values; all others must fail cleanly.
            match r {
                Ok(v) => assert!(v.len() < 3, "cut {cut} decoded {v:?}"),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        // Only the boundaries after "connect" and after the transaction id succeed.
        let ok: Vec<usize> = (0..b.len())
            .filter(|&c| decode_all(&b[..c], &limits).is_ok())
            .collect();
        assert_eq!(ok, vec![0, 10, 19]);
    }

    #[test]
    fn captured_connects_decode_and_truncate_cleanly() {
        let limits = AmfLimits::default();
        for (bytes, flash_ver) in [
            (
                FFMPEG_PUBLISH_CONNECT,
                "FMLE/3.0 (compatible; Lavf59.27.100)",
            ),
            (FFMPEG_PLAY_CONNECT, "LNX 9,0,124,2"),
        ] {
            let v = decode_all(bytes, &limits).unwrap();
            assert_eq!(v.len(), 3);
            assert_eq!(v[0].as_str(), Some("connect"));
            let o = &v[2];
            assert_eq!(
                o.get("flashVer").and_then(Amf0Value::as_str),
                Some(flash_ver)
            );
            assert_eq!(
                o.get("tcUrl").and_then(Amf0Value::as_str),
                Some("rtmp://127.0.0.1:36641/live")
            );
            // Our encoder reproduces the capture byte for byte.
            assert_eq!(&encode_all(&v)[..], bytes);
            for cut in 0..bytes.len() {
                if let Ok(v) = decode_all(&bytes[..cut], &limits) {
                    assert!(cut == 0 || cut == 10 || cut == 19, "cut {cut}: {v:?}");
                }
            }
        }
        let play = decode_all(FFMPEG_PLAY_CONNECT, &limits).unwrap();
        assert_eq!(
            play[2].get("videoFunction").and_then(Amf0Value::as_f64),
            Some(1.0)
        );
    }

    #[test]
    fn seventy_thousand_nested_arrays_stop_at_depth_limit() {
        let n = 70_000;
        let mut b = Vec::with_capacity(n * 5 + 5);
        for _ in 0..n {
            b.extend_from_slice(&[marker::STRICT_ARRAY, 0, 0, 0, 1]);
        }
        b.push(marker::NULL);
        let e = decode_all(&b, &AmfLimits::default()).unwrap_err();
        assert!(matches!(e, AmfError::TooDeep { limit: 64, .. }), "{e}");
        // Nested objects and ECMA arrays too.
        let mut b = Vec::new();
        for _ in 0..n {
            b.extend_from_slice(&[marker::OBJECT, 0, 1, b'a']);
        }
        let e = decode_all(&b, &AmfLimits::default()).unwrap_err();
        assert!(matches!(e, AmfError::TooDeep { .. }), "{e}");
        // A configured depth beyond the hard cap is capped.
        let limits = AmfLimits {
            max_depth: 1_000_000,
            ..AmfLimits::default()
        };
        let e = decode_all(&b, &limits).unwrap_err();
        assert!(
            matches!(
                e,
                AmfError::TooDeep {
                    limit: HARD_MAX_DEPTH,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn one_megabyte_string() {
        let limits = AmfLimits::default();
        let s = "x".repeat(1024 * 1024);
        let b = encode_all(&[Amf0Value::String(s.clone())]);
        assert_eq!(b[0], marker::LONG_STRING);
        let v = decode_all(&b, &limits).unwrap();
        assert_eq!(v[0].as_str(), Some(s.as_str()));
        // One byte more than the limit is refused before it is copied.
        let s = "x".repeat(1024 * 1024 + 1);
        let b = encode_all(&[Amf0Value::LongString(s)]);
        let e = decode_all(&b, &limits).unwrap_err();
        assert!(matches!(e, AmfError::StringTooLong { .. }), "{e}");
    }

    #[test]
    fn declared_counts_larger_than_input_are_refused_without_allocating() {
        let b = [marker::STRICT_ARRAY, 0xff, 0xff, 0xff, 0xff, marker::NULL];
        let e = decode_all(&b, &AmfLimits::default()).unwrap_err();
        assert!(matches!(e, AmfError::CountExceedsInput { .. }), "{e}");
        let b = [marker::LONG_STRING, 0xff, 0xff, 0xff, 0xff, b'a'];
        assert!(decode_all(&b, &AmfLimits::default()).is_err());
    }

    #[test]
    fn references_must_point_backwards() {
        let b = [marker::REFERENCE, 0, 0];
        let e = decode_all(&b, &AmfLimits::default()).unwrap_err();
        assert!(matches!(e, AmfError::BadReference { .. }), "{e}");
        let b = [marker::OBJECT, 0, 0, 9, marker::REFERENCE, 0, 0];
        let v = decode_all(&b, &AmfLimits::default()).unwrap();
        assert_eq!(v[1], Amf0Value::Reference(0));
    }

    #[test]
    fn entries_limit_counts_the_whole_payload() {
        let limits = AmfLimits {
            max_entries: 10,
            ..AmfLimits::default()
        };
        let b = vec![marker::NULL; 11];
        assert!(matches!(
            decode_all(&b, &limits),
            Err(AmfError::TooManyEntries { limit: 10 })
        ));
        assert_eq!(decode_all(&b[..10], &limits).unwrap().len(), 10);
    }

    #[test]
    fn bad_markers_and_object_end() {
        for m in [
            marker::MOVIECLIP,
            marker::RECORDSET,
            marker::OBJECT_END,
            0x12,
            0xff,
        ] {
            assert!(matches!(
                decode_all(&[m], &AmfLimits::default()),
                Err(AmfError::UnknownMarker { .. })
            ));
        }
        let b = [marker::OBJECT, 0, 0, marker::NULL];
        assert!(matches!(
            decode_all(&b, &AmfLimits::default()),
            Err(AmfError::MissingObjectEnd { .. })
        ));
    }

    #[test]
    fn lossy_utf8() {
        let b = [marker::STRING, 0, 2, 0xff, b'a'];
        let v = decode_all(&b, &AmfLimits::default()).unwrap();
        assert_eq!(v[0].as_str(), Some("\u{fffd}a"));
    }

    #[test]
    fn decode_one_reports_length() {
        let b = encode_all(&[Amf0Value::Number(2.0), Amf0Value::Null]);
        let (v, n) = decode_one(&b, &AmfLimits::default()).unwrap();
        assert_eq!((v, n), (Amf0Value::Number(2.0), 9));
    }

    pub(crate) fn arb_key() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_@ é]{1,12}"
    }

    pub(crate) fn arb_amf0() -> impl Strategy<Value = Amf0Value> {
        let leaf = prop_oneof![
            any::<f64>()
                .prop_filter("NaN never equals itself", |f| !f.is_nan())
                .prop_map(Amf0Value::Number),
            any::<bool>().prop_map(Amf0Value::Boolean),
            ".{0,20}".prop_map(Amf0Value::String),
            ".{0,20}".prop_map(Amf0Value::LongString),
            ".{0,20}".prop_map(Amf0Value::XmlDocument),
            Just(Amf0Value::Null),
            Just(Amf0Value::Undefined),
            Just(Amf0Value::Unsupported),
            (any::<i64>(), any::<i16>()).prop_map(|(m, tz)| Amf0Value::Date {
                millis: m as f64,
                tz
            }),
            crate::amf3::tests::arb_amf3().prop_map(Amf0Value::Amf3),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec((arb_key(), inner.clone()), 0..6).prop_map(Amf0Value::Object),
                prop::collection::vec((arb_key(), inner.clone()), 0..6)
                    .prop_map(Amf0Value::EcmaArray),
                prop::collection::vec(inner.clone(), 0..6).prop_map(Amf0Value::StrictArray),
                (arb_key(), prop::collection::vec((arb_key(), inner), 0..6))
                    .prop_map(|(class, props)| Amf0Value::TypedObject { class, props }),
            ]
        })
    }

    proptest! {
        #[test]
        fn roundtrip(values in prop::collection::vec(arb_amf0(), 0..5)) {
            let b = encode_all(&values);
            let back = decode_all(&b, &AmfLimits::default()).unwrap();
            prop_assert_eq!(back, values);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_all(&b, &AmfLimits::default());
        }
    }
}
