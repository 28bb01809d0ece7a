//! AMF3 values: decode and encode (string, object and trait references), with limits.
//!
//! Each AMF3 payload (a whole type 15 body, or one value after the AMF0 AVM+ switch
//! marker) starts with empty string, object and trait reference tables. References
//! that point past what was decoded so far are errors. Object references are kept
//! unresolved ([`Amf3Value::Reference`]) so a few bytes cannot copy a large object many
//! times; string and trait references are resolved, and what they copy is charged to
//! [`AmfLimits::max_total`].
//!
//! The encoder writes every string, object and trait inline (references are optional in
//! AMF3), so encoding is stateless; a decoded `Reference` re-encodes to the same index
//! because objects are written in the same order they were read.

use bytes::{BufMut, BytesMut};

use crate::amf::{AmfError, AmfLimits, Budget, Reader};

pub use crate::amf::AmfError as Amf3Error;

/// AMF3 type markers (AMF3 specification, section 3.1).
pub mod marker {
    pub const UNDEFINED: u8 = 0x00;
    pub const NULL: u8 = 0x01;
    pub const FALSE: u8 = 0x02;
    pub const TRUE: u8 = 0x03;
    pub const INTEGER: u8 = 0x04;
    pub const DOUBLE: u8 = 0x05;
    pub const STRING: u8 = 0x06;
    pub const XML_DOC: u8 = 0x07;
    pub const DATE: u8 = 0x08;
    pub const ARRAY: u8 = 0x09;
    pub const OBJECT: u8 = 0x0A;
    pub const XML: u8 = 0x0B;
    pub const BYTE_ARRAY: u8 = 0x0C;
    pub const VECTOR_INT: u8 = 0x0D;
    pub const VECTOR_UINT: u8 = 0x0E;
    pub const VECTOR_DOUBLE: u8 = 0x0F;
    pub const VECTOR_OBJECT: u8 = 0x10;
    pub const DICTIONARY: u8 = 0x11;
}

/// Largest value a U29 can carry.
pub const U29_MAX: u32 = (1 << 29) - 1;
/// Largest length or count a U29 with a flag bit can carry.
const U28_MAX: usize = (1 << 28) - 1;
/// Smallest and largest AMF3 integer (29-bit two's complement).
pub const INT_MIN: i32 = -(1 << 28);
pub const INT_MAX: i32 = (1 << 28) - 1;

/// Externalizable classes whose external form is known: one AMF3 value.
const KNOWN_EXTERNALIZABLE: [&str; 3] = [
    "flex.messaging.io.ArrayCollection",
    "flex.messaging.io.ArrayList",
    "flex.messaging.io.ObjectProxy",
];

/// One AMF3 value.
#[derive(Clone, Debug, PartialEq)]
pub enum Amf3Value {
    Undefined,
    Null,
    Boolean(bool),
    /// 29-bit signed integer; outside [`INT_MIN`]..=[`INT_MAX`] it is encoded as a double.
    Integer(i32),
    Double(f64),
    String(String),
    XmlDoc(String),
    /// Milliseconds since the epoch, UTC.
    Date(f64),
    Array {
        assoc: Vec<(String, Amf3Value)>,
        dense: Vec<Amf3Value>,
    },
    Object(Amf3Object),
    /// An instance of a known externalizable class (ArrayCollection, ObjectProxy...),
    /// whose external form is one AMF3 value.
    External {
        class_name: String,
        value: Box<Amf3Value>,
    },
    Xml(String),
    ByteArray(Vec<u8>),
    VectorInt {
        fixed: bool,
        items: Vec<i32>,
    },
    VectorUint {
        fixed: bool,
        items: Vec<u32>,
    },
    VectorDouble {
        fixed: bool,
        items: Vec<f64>,
    },
    VectorObject {
        fixed: bool,
        type_name: String,
        items: Vec<Amf3Value>,
    },
    Dictionary {
        weak_keys: bool,
        entries: Vec<(Amf3Value, Amf3Value)>,
    },
    /// A reference to the `index`th complex value of this payload, sent with `marker`.
    Reference {
        marker: u8,
        index: u32,
    },
}

/// A typed or anonymous object: sealed members in trait order, then dynamic members.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Amf3Object {
    /// Empty for an anonymous object.
    pub class_name: String,
    pub dynamic: bool,
    pub sealed: Vec<(String, Amf3Value)>,
    pub dynamic_props: Vec<(String, Amf3Value)>,
}

#[derive(Clone)]
struct Traits {
    class_name: String,
    dynamic: bool,
    externalizable: bool,
    sealed: Vec<String>,
}

struct Decoder<'r, 'a, 'b, 'l> {
    r: &'r mut Reader<'a>,
    budget: &'b mut Budget<'l>,
    strings: Vec<String>,
    traits: Vec<Traits>,
    objects: usize,
}

/// Decodes one AMF3 value from the front of `buf`; returns it and the bytes it used.
pub fn decode_one(buf: &[u8], limits: &AmfLimits) -> Result<(Amf3Value, usize), AmfError> {
    let mut r = Reader::new(buf);
    let mut budget = Budget::new(limits);
    let v = decode_in(&mut r, &mut budget, 0)?;
    Ok((v, r.pos()))
}

/// Decodes every value in `buf`, sharing one set of reference tables.
pub fn decode_all(buf: &[u8], limits: &AmfLimits) -> Result<Vec<Amf3Value>, AmfError> {
    let mut r = Reader::new(buf);
    let mut budget = Budget::new(limits);
    let mut d = Decoder {
        r: &mut r,
        budget: &mut budget,
        strings: Vec::new(),
        traits: Vec::new(),
        objects: 0,
    };
    let mut out = Vec::new();
    while !d.r.is_empty() {
        out.push(d.value(0)?);
    }
    Ok(out)
}

/// Decodes one value with fresh reference tables (used after the AMF0 switch marker).
pub(crate) fn decode_in(
    r: &mut Reader<'_>,
    budget: &mut Budget<'_>,
    depth: usize,
) -> Result<Amf3Value, AmfError> {
    let mut d = Decoder {
        r,
        budget,
        strings: Vec::new(),
        traits: Vec::new(),
        objects: 0,
    };
    d.value(depth)
}

fn read_u29(r: &mut Reader<'_>) -> Result<u32, AmfError> {
    let mut v: u32 = 0;
    for _ in 0..3 {
        let b = r.u8()?;
        v = (v << 7) | u32::from(b & 0x7f);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    let b = r.u8()?;
    Ok((v << 8) | u32::from(b))
}

fn bad_ref(kind: &'static str, index: u32, known: usize, at: usize) -> AmfError {
    AmfError::BadReference {
        version: 3,
        kind,
        index,
        known,
        at,
    }
}

/// Either an inline length (flag bit set) or a reference index.
enum Header {
    Inline(usize),
    Ref(u32),
}

impl Decoder<'_, '_, '_, '_> {
    fn header(&mut self) -> Result<Header, AmfError> {
        let u = read_u29(self.r)?;
        Ok(if u & 1 == 1 {
            Header::Inline((u >> 1) as usize)
        } else {
            Header::Ref(u >> 1)
        })
    }

    fn string(&mut self) -> Result<String, AmfError> {
        let at = self.r.pos();
        match self.header()? {
            Header::Inline(len) => {
                let s = self.budget.string(self.r, len)?;
                if !s.is_empty() {
                    self.strings.push(s.clone());
                }
                Ok(s)
            }
            Header::Ref(i) => {
                let s = self
                    .strings
                    .get(i as usize)
                    .ok_or_else(|| bad_ref("string", i, self.strings.len(), at))?;
                self.budget.bytes(s.len())?;
                Ok(s.clone())
            }
        }
    }

    /// A complex value's header: a new entry in the object table, or a reference to one.
    fn complex(&mut self, m: u8, at: usize) -> Result<Result<usize, Amf3Value>, AmfError> {
        match self.header()? {
            Header::Ref(index) => {
                if index as usize >= self.objects {
                    return Err(bad_ref("object", index, self.objects, at));
                }
                Ok(Err(Amf3Value::Reference { marker: m, index }))
            }
            Header::Inline(n) => {
                self.objects = self.objects.saturating_add(1);
                Ok(Ok(n))
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Amf3Value, AmfError> {
        self.budget.entry()?;
        let at = self.r.pos();
        let m = self.r.u8()?;
        Ok(match m {
            marker::UNDEFINED => Amf3Value::Undefined,
            marker::NULL => Amf3Value::Null,
            marker::FALSE => Amf3Value::Boolean(false),
            marker::TRUE => Amf3Value::Boolean(true),
            marker::INTEGER => {
                let u = read_u29(self.r)?;
                // Sign-extend from 29 bits.
                Amf3Value::Integer(((u << 3) as i32) >> 3)
            }
            marker::DOUBLE => Amf3Value::Double(self.r.f64()?),
            marker::STRING => Amf3Value::String(self.string()?),
            marker::XML_DOC | marker::XML => match self.complex(m, at)? {
                Err(r) => r,
                Ok(len) => {
                    let s = self.budget.string(self.r, len)?;
                    if m == marker::XML {
                        Amf3Value::Xml(s)
                    } else {
                        Amf3Value::XmlDoc(s)
                    }
                }
            },
            marker::DATE => match self.complex(m, at)? {
                Err(r) => r,
                Ok(_) => Amf3Value::Date(self.r.f64()?),
            },
            marker::BYTE_ARRAY => match self.complex(m, at)? {
                Err(r) => r,
                Ok(len) => Amf3Value::ByteArray(self.budget.raw(self.r, len)?.to_vec()),
            },
            marker::ARRAY => {
                self.budget.depth(depth, at)?;
                match self.complex(m, at)? {
                    Err(r) => r,
                    Ok(count) => {
                        let mut assoc = Vec::new();
                        loop {
                            let key = self.string()?;
                            if key.is_empty() {
                                break;
                            }
                            assoc.push((key, self.value(depth + 1)?));
                        }
                        let reserve = self.budget.count(self.r, count, 1)?;
                        let mut dense = Vec::with_capacity(reserve);
                        for _ in 0..count {
                            dense.push(self.value(depth + 1)?);
                        }
                        Amf3Value::Array { assoc, dense }
                    }
                }
            }
            marker::OBJECT => {
                self.budget.depth(depth, at)?;
                self.object(depth, at)?
            }
            marker::VECTOR_INT | marker::VECTOR_UINT | marker::VECTOR_DOUBLE => {
                match self.complex(m, at)? {
                    Err(r) => r,
                    Ok(count) => {
                        let fixed = self.r.u8()? != 0;
                        let each = if m == marker::VECTOR_DOUBLE { 8 } else { 4 };
                        // Collected from the bytes in hand, so sized by what arrived.
                        let _ = self.budget.count(self.r, count, each)?;
                        let raw = self.r.take(count.saturating_mul(each))?;
                        match m {
                            marker::VECTOR_INT => Amf3Value::VectorInt {
                                fixed,
                                items: raw
                                    .chunks_exact(4)
                                    .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                                    .collect(),
                            },
                            marker::VECTOR_UINT => Amf3Value::VectorUint {
                                fixed,
                                items: raw
                                    .chunks_exact(4)
                                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                                    .collect(),
                            },
                            _ => Amf3Value::VectorDouble {
                                fixed,
                                items: raw
                                    .chunks_exact(8)
                                    .map(|c| {
                                        let mut a = [0u8; 8];
                                        a.copy_from_slice(c);
                                        f64::from_be_bytes(a)
                                    })
                                    .collect(),
                            },
                        }
                    }
                }
            }
            marker::VECTOR_OBJECT => {
                self.budget.depth(depth, at)?;
                match self.complex(m, at)? {
                    Err(r) => r,
                    Ok(count) => {
                        let fixed = self.r.u8()? != 0;
                        let type_name = self.string()?;
                        let reserve = self.budget.count(self.r, count, 1)?;
                        let mut items = Vec::with_capacity(reserve);
                        for _ in 0..count {
                            items.push(self.value(depth + 1)?);
                        }
                        Amf3Value::VectorObject {
                            fixed,
                            type_name,
                            items,
                        }
                    }
                }
            }
            marker::DICTIONARY => {
                self.budget.depth(depth, at)?;
                match self.complex(m, at)? {
                    Err(r) => r,
                    Ok(count) => {
                        let weak_keys = self.r.u8()? != 0;
                        let reserve = self.budget.count(self.r, count, 2)?;
                        let mut entries = Vec::with_capacity(reserve);
                        for _ in 0..count {
                            let k = self.value(depth + 1)?;
                            let v = self.value(depth + 1)?;
                            entries.push((k, v));
                        }
                        Amf3Value::Dictionary { weak_keys, entries }
                    }
                }
            }
            _ => {
                return Err(AmfError::UnknownMarker {
                    version: 3,
                    marker: m,
                    at,
                })
            }
        })
    }

    fn object(&mut self, depth: usize, at: usize) -> Result<Amf3Value, AmfError> {
        let u = read_u29(self.r)?;
        if u & 1 == 0 {
            let index = u >> 1;
            if index as usize >= self.objects {
                return Err(bad_ref("object", index, self.objects, at));
            }
            return Ok(Amf3Value::Reference {
                marker: marker::OBJECT,
                index,
            });
        }
        self.objects = self.objects.saturating_add(1);
        let traits = if u & 2 == 0 {
            let index = u >> 2;
            let t = self
                .traits
                .get(index as usize)
                .ok_or_else(|| bad_ref("trait", index, self.traits.len(), at))?
                .clone();
            let copied = t.class_name.len() + t.sealed.iter().map(String::len).sum::<usize>();
            self.budget.bytes(copied)?;
            t
        } else if u & 4 != 0 {
            let class_name = self.string()?;
            let t = Traits {
                class_name,
                dynamic: false,
                externalizable: true,
                sealed: Vec::new(),
            };
            self.traits.push(t.clone());
            t
        } else {
            let dynamic = u & 8 != 0;
            let count = (u >> 4) as usize;
            let class_name = self.string()?;
            let reserve = self.budget.count(self.r, count, 1)?;
            let mut sealed = Vec::with_capacity(reserve);
            for _ in 0..count {
                sealed.push(self.string()?);
            }
            let t = Traits {
                class_name,
                dynamic,
                externalizable: false,
                sealed,
            };
            self.traits.push(t.clone());
            t
        };
        if traits.externalizable {
            if !KNOWN_EXTERNALIZABLE.contains(&traits.class_name.as_str()) {
                return Err(AmfError::Externalizable {
                    class: traits.class_name,
                    at,
                });
            }
            let value = self.value(depth + 1)?;
            return Ok(Amf3Value::External {
                class_name: traits.class_name,
                value: Box::new(value),
            });
        }
        let mut sealed = Vec::with_capacity(traits.sealed.len());
        for name in traits.sealed {
            let v = self.value(depth + 1)?;
            sealed.push((name, v));
        }
        let mut dynamic_props = Vec::new();
        if traits.dynamic {
            loop {
                let key = self.string()?;
                if key.is_empty() {
                    break;
                }
                dynamic_props.push((key, self.value(depth + 1)?));
            }
        }
        Ok(Amf3Value::Object(Amf3Object {
            class_name: traits.class_name,
            dynamic: traits.dynamic,
            sealed,
            dynamic_props,
        }))
    }
}

/// Writes a U29; values above [`U29_MAX`] are clamped (no AMF3 form can carry them).
pub fn put_u29(out: &mut BytesMut, v: u32) {
    let v = v.min(U29_MAX);
    if v < 0x80 {
        out.put_u8(v as u8);
    } else if v < 0x4000 {
        out.put_slice(&[((v >> 7) as u8) | 0x80, (v & 0x7f) as u8]);
    } else if v < 0x20_0000 {
        out.put_slice(&[
            ((v >> 14) as u8) | 0x80,
            ((v >> 7) as u8) | 0x80,
            (v & 0x7f) as u8,
        ]);
    } else {
        out.put_slice(&[
            ((v >> 22) as u8) | 0x80,
            ((v >> 15) as u8) | 0x80,
            ((v >> 8) as u8) | 0x80,
            v as u8,
        ]);
    }
}

/// A length or count with the "inline" flag bit; lengths past 2^28-1 are cut to it.
fn put_inline(out: &mut BytesMut, n: usize) -> usize {
    let n = n.min(U28_MAX);
    put_u29(out, ((n as u32) << 1) | 1);
    n
}

fn put_string(out: &mut BytesMut, s: &str) {
    let n = put_inline(out, s.len());
    out.put_slice(&s.as_bytes()[..n]);
}

fn put_props(out: &mut BytesMut, props: &[(String, Amf3Value)]) {
    for (k, v) in props {
        if k.is_empty() {
            // The empty key ends the list; such a member cannot be written.
            continue;
        }
        put_string(out, k);
        v.encode(out);
    }
    out.put_u8(0x01);
}

impl Amf3Value {
    /// Appends the AMF3 encoding (marker included).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Amf3Value::Undefined => out.put_u8(marker::UNDEFINED),
            Amf3Value::Null => out.put_u8(marker::NULL),
            Amf3Value::Boolean(false) => out.put_u8(marker::FALSE),
            Amf3Value::Boolean(true) => out.put_u8(marker::TRUE),
            Amf3Value::Integer(i) if (INT_MIN..=INT_MAX).contains(i) => {
                out.put_u8(marker::INTEGER);
                put_u29(out, (*i as u32) & U29_MAX);
            }
            Amf3Value::Integer(i) => {
                out.put_u8(marker::DOUBLE);
                out.put_f64(f64::from(*i));
            }
            Amf3Value::Double(d) => {
                out.put_u8(marker::DOUBLE);
                out.put_f64(*d);
            }
            Amf3Value::String(s) => {
                out.put_u8(marker::STRING);
                put_string(out, s);
            }
            Amf3Value::XmlDoc(s) => {
                out.put_u8(marker::XML_DOC);
                put_string(out, s);
            }
            Amf3Value::Xml(s) => {
                out.put_u8(marker::XML);
                put_string(out, s);
            }
            Amf3Value::Date(ms) => {
                out.put_u8(marker::DATE);
                out.put_u8(0x01);
                out.put_f64(*ms);
            }
            Amf3Value::Array { assoc, dense } => {
                out.put_u8(marker::ARRAY);
                let n = put_inline(out, dense.len());
                put_props(out, assoc);
                for v in &dense[..n] {
                    v.encode(out);
                }
            }
            Amf3Value::Object(o) => {
                out.put_u8(marker::OBJECT);
                let n = o.sealed.len().min((U29_MAX >> 4) as usize);
                put_u29(out, ((n as u32) << 4) | (u32::from(o.dynamic) << 3) | 0b011);
                put_string(out, &o.class_name);
                for (k, _) in &o.sealed[..n] {
                    put_string(out, k);
                }
                for (_, v) in &o.sealed[..n] {
                    v.encode(out);
                }
                if o.dynamic {
                    put_props(out, &o.dynamic_props);
                }
            }
            Amf3Value::External { class_name, value } => {
                out.put_u8(marker::OBJECT);
                put_u29(out, 0b0111);
                put_string(out, class_name);
                value.encode(out);
            }
            Amf3Value::ByteArray(b) => {
                out.put_u8(marker::BYTE_ARRAY);
                let n = put_inline(out, b.len());
                out.put_slice(&b[..n]);
            }
            Amf3Value::VectorInt { fixed, items } => {
                out.put_u8(marker::VECTOR_INT);
                let n = put_inline(out, items.len());
                out.put_u8(u8::from(*fixed));
                for i in &items[..n] {
                    out.put_i32(*i);
                }
            }
            Amf3Value::VectorUint { fixed, items } => {
                out.put_u8(marker::VECTOR_UINT);
                let n = put_inline(out, items.len());
                out.put_u8(u8::from(*fixed));
                for i in &items[..n] {
                    out.put_u32(*i);
                }
            }
            Amf3Value::VectorDouble { fixed, items } => {
                out.put_u8(marker::VECTOR_DOUBLE);
                let n = put_inline(out, items.len());
                out.put_u8(u8::from(*fixed));
                for d in &items[..n] {
                    out.put_f64(*d);
                }
            }
            Amf3Value::VectorObject {
                fixed,
                type_name,
                items,
            } => {
                out.put_u8(marker::VECTOR_OBJECT);
                let n = put_inline(out, items.len());
                out.put_u8(u8::from(*fixed));
                put_string(out, type_name);
                for v in &items[..n] {
                    v.encode(out);
                }
            }
            Amf3Value::Dictionary { weak_keys, entries } => {
                out.put_u8(marker::DICTIONARY);
                let n = put_inline(out, entries.len());
                out.put_u8(u8::from(*weak_keys));
                for (k, v) in &entries[..n] {
                    k.encode(out);
                    v.encode(out);
                }
            }
            Amf3Value::Reference { marker, index } => {
                out.put_u8(*marker);
                put_u29(out, index.saturating_mul(2).min(U29_MAX - 1));
            }
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Amf3Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Whether this value or anything inside it is an object-table reference, which
    /// only means something next to the values it was decoded with.
    pub fn has_reference(&self) -> bool {
        match self {
            Amf3Value::Reference { .. } => true,
            Amf3Value::Array { assoc, dense } => {
                assoc.iter().any(|(_, v)| v.has_reference())
                    || dense.iter().any(Self::has_reference)
            }
            Amf3Value::Object(o) => o
                .sealed
                .iter()
                .chain(&o.dynamic_props)
                .any(|(_, v)| v.has_reference()),
            Amf3Value::External { value, .. } => value.has_reference(),
            Amf3Value::VectorObject { items, .. } => items.iter().any(Self::has_reference),
            Amf3Value::Dictionary { entries, .. } => entries
                .iter()
                .any(|(k, v)| k.has_reference() || v.has_reference()),
            _ => false,
        }
    }
}

/// Encodes values one after another.
pub fn encode_all(values: &[Amf3Value]) -> bytes::Bytes {
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

    fn lim() -> AmfLimits {
        AmfLimits::default()
    }

    fn enc(v: &Amf3Value) -> Vec<u8> {
        let mut b = BytesMut::new();
        v.encode(&mut b);
        b.to_vec()
    }

    #[test]
    fn u29_hand_checked() {
        let cases: [(u32, &[u8]); 6] = [
            (0, &[0x00]),
            (0x7f, &[0x7f]),
            (0x80, &[0x81, 0x00]),
            (0x3fff, &[0xff, 0x7f]),
            (0x4000, &[0x81, 0x80, 0x00]),
            (U29_MAX, &[0xff, 0xff, 0xff, 0xff]),
        ];
        for (v, bytes) in cases {
            let mut b = BytesMut::new();
            put_u29(&mut b, v);
            assert_eq!(&b[..], bytes, "{v:#x}");
            assert_eq!(read_u29(&mut Reader::new(bytes)).unwrap(), v);
        }
    }

    #[test]
    fn integers_sign_extend() {
        assert_eq!(enc(&Amf3Value::Integer(-1)), [4, 0xff, 0xff, 0xff, 0xff]);
        let (v, _) = decode_one(&[4, 0xff, 0xff, 0xff, 0xff], &lim()).unwrap();
        assert_eq!(v, Amf3Value::Integer(-1));
        let (v, _) = decode_one(&[4, 0xc0, 0x80, 0x80, 0x00], &lim()).unwrap();
        assert_eq!(v, Amf3Value::Integer(INT_MIN));
        // Out of range integers become doubles.
        assert_eq!(enc(&Amf3Value::Integer(1 << 28))[0], marker::DOUBLE);
    }

    #[test]
    fn string_and_trait_references_resolve() {
        // Array of two anonymous objects sharing traits {a}, and a string reference.
        let b = [
            marker::ARRAY,
            0x05, // dense count 2
            0x01, // no assoc
            marker::OBJECT,
            0x13, // inline traits, 1 sealed, not dynamic
            0x01, // class ""
            0x03,
            b'a', // sealed name "a" (string table 0)
            marker::STRING,
            0x03,
            b'x', // "x" (string table 1)
            marker::OBJECT,
            0x01, // traits reference 0
            marker::STRING,
            0x02, // string reference 1 -> "x"
        ];
        let (v, n) = decode_one(&b, &lim()).unwrap();
        assert_eq!(n, b.len());
        let obj = Amf3Value::Object(Amf3Object {
            class_name: String::new(),
            dynamic: false,
            sealed: vec![("a".into(), Amf3Value::String("x".into()))],
            dynamic_props: vec![],
        });
        assert_eq!(
            v,
            Amf3Value::Array {
                assoc: vec![],
                dense: vec![obj.clone(), obj]
            }
        );
    }

    #[test]
    fn unknown_reference_indices_are_errors() {
        // String reference 0 with an empty table.
        let e = decode_one(&[marker::STRING, 0x00], &lim()).unwrap_err();
        assert!(
            matches!(e, AmfError::BadReference { kind: "string", .. }),
            "{e}"
        );
        // Object reference 0 before any object.
        let e = decode_one(&[marker::OBJECT, 0x00], &lim()).unwrap_err();
        assert!(
            matches!(e, AmfError::BadReference { kind: "object", .. }),
            "{e}"
        );
        // Trait reference 5 inside a first object.
        let e = decode_one(&[marker::OBJECT, 0x15], &lim()).unwrap_err();
        assert!(
            matches!(e, AmfError::BadReference { kind: "trait", .. }),
            "{e}"
        );
        // Array reference to itself is allowed (index 0 is the array being read)...
        let (v, _) = decode_one(&[marker::ARRAY, 0x03, 0x01, marker::ARRAY, 0x00], &lim()).unwrap();
        assert_eq!(
            v,
            Amf3Value::Array {
                assoc: vec![],
                dense: vec![Amf3Value::Reference {
                    marker: marker::ARRAY,
                    index: 0
                }]
            }
        );
        // ...but index 1 is not known yet.
        assert!(decode_one(&[marker::ARRAY, 0x03, 0x01, marker::DATE, 0x02], &lim()).is_err());
    }

    #[test]
    fn unknown_externalizable_is_refused() {
        let mut b = vec![marker::OBJECT, 0x07, 0x07];
        b.extend_from_slice(b"foo");
        let e = decode_one(&b, &lim()).unwrap_err();
        assert!(matches!(e, AmfError::Externalizable { .. }), "{e}");
        let v = Amf3Value::External {
            class_name: "flex.messaging.io.ArrayCollection".into(),
            value: Box::new(Amf3Value::Array {
                assoc: vec![],
                dense: vec![Amf3Value::Integer(1)],
            }),
        };
        assert_eq!(decode_one(&enc(&v), &lim()).unwrap().0, v);
    }

    #[test]
    fn seventy_thousand_nested_arrays() {
        let mut b = Vec::new();
        for _ in 0..70_000 {
            b.extend_from_slice(&[marker::ARRAY, 0x03, 0x01]);
        }
        b.push(marker::NULL);
        let e = decode_one(&b, &lim()).unwrap_err();
        assert!(matches!(e, AmfError::TooDeep { .. }), "{e}");
        // Objects, vectors of objects and dictionaries nest too.
        let mut b = Vec::new();
        for _ in 0..70_000 {
            b.extend_from_slice(&[marker::DICTIONARY, 0x03, 0x00, marker::NULL]);
        }
        assert!(matches!(
            decode_one(&b, &lim()),
            Err(AmfError::TooDeep { .. })
        ));
        let mut b = Vec::new();
        for _ in 0..70_000 {
            b.extend_from_slice(&[marker::OBJECT, 0x0b, 0x01, 0x03, b'k']);
        }
        assert!(matches!(
            decode_one(&b, &lim()),
            Err(AmfError::TooDeep { .. })
        ));
    }

    #[test]
    fn string_reference_amplification_is_bounded() {
        // One 1 MiB string then a dense array of references to it.
        let limits = lim();
        let mut b = BytesMut::new();
        b.put_u8(marker::ARRAY);
        put_inline(&mut b, 60_000);
        b.put_u8(0x01);
        Amf3Value::String("y".repeat(1 << 20)).encode(&mut b);
        for _ in 1..60_000 {
            b.put_slice(&[marker::STRING, 0x00]);
        }
        let e = decode_one(&b, &limits).unwrap_err();
        assert!(matches!(e, AmfError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn declared_lengths_are_checked_against_input() {
        for m in [
            marker::STRING,
            marker::BYTE_ARRAY,
            marker::ARRAY,
            marker::VECTOR_INT,
            marker::VECTOR_DOUBLE,
            marker::VECTOR_OBJECT,
            marker::DICTIONARY,
        ] {
            let b = [m, 0xbf, 0xff, 0xff, 0xff, 0x00];
            assert!(decode_one(&b, &lim()).is_err(), "marker {m}");
        }
    }

    #[test]
    fn all_markers_roundtrip() {
        let vals = vec![
            Amf3Value::Undefined,
            Amf3Value::Null,
            Amf3Value::Boolean(true),
            Amf3Value::Integer(-5),
            Amf3Value::Double(1.5),
            Amf3Value::String("s".into()),
            Amf3Value::XmlDoc("<a/>".into()),
            Amf3Value::Date(1e12),
            Amf3Value::Xml("<b/>".into()),
            Amf3Value::ByteArray(vec![1, 2, 3]),
            Amf3Value::VectorInt {
                fixed: true,
                items: vec![-1, 2],
            },
            Amf3Value::VectorUint {
                fixed: false,
                items: vec![u32::MAX],
            },
            Amf3Value::VectorDouble {
                fixed: false,
                items: vec![0.25],
            },
            Amf3Value::VectorObject {
                fixed: false,
                type_name: "Foo".into(),
                items: vec![Amf3Value::Null],
            },
            Amf3Value::Dictionary {
                weak_keys: true,
                entries: vec![(Amf3Value::Integer(1), Amf3Value::String("one".into()))],
            },
            Amf3Value::Reference {
                marker: marker::DATE,
                index: 0,
            },
        ];
        let b = encode_all(&vals);
        assert_eq!(decode_all(&b, &lim()).unwrap(), vals);
    }

    fn key() -> impl Strategy<Value = String> {
        "[a-z0-9_]{1,8}"
    }

    pub(crate) fn arb_amf3() -> impl Strategy<Value = Amf3Value> {
        let leaf = prop_oneof![
            Just(Amf3Value::Undefined),
            Just(Amf3Value::Null),
            any::<bool>().prop_map(Amf3Value::Boolean),
            (INT_MIN..=INT_MAX).prop_map(Amf3Value::Integer),
            any::<f64>()
                .prop_filter("NaN never equals itself", |f| !f.is_nan())
                .prop_map(Amf3Value::Double),
            ".{0,12}".prop_map(Amf3Value::String),
            ".{0,12}".prop_map(Amf3Value::XmlDoc),
            ".{0,12}".prop_map(Amf3Value::Xml),
            any::<i64>().prop_map(|m| Amf3Value::Date(m as f64)),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(Amf3Value::ByteArray),
            (any::<bool>(), prop::collection::vec(any::<i32>(), 0..4))
                .prop_map(|(fixed, items)| Amf3Value::VectorInt { fixed, items }),
            (any::<bool>(), prop::collection::vec(any::<u32>(), 0..4))
                .prop_map(|(fixed, items)| Amf3Value::VectorUint { fixed, items }),
            (any::<bool>(), prop::collection::vec(-1e9f64..1e9, 0..4))
                .prop_map(|(fixed, items)| Amf3Value::VectorDouble { fixed, items }),
        ];
        leaf.prop_recursive(3, 32, 4, |inner| {
            prop_oneof![
                (
                    prop::collection::vec((key(), inner.clone()), 0..4),
                    prop::collection::vec(inner.clone(), 0..4)
                )
                    .prop_map(|(assoc, dense)| Amf3Value::Array { assoc, dense }),
                (
                    "[A-Za-z.]{0,8}",
                    any::<bool>(),
                    prop::collection::vec((key(), inner.clone()), 0..4),
                    prop::collection::vec((key(), inner.clone()), 0..4)
                )
                    .prop_map(|(class_name, dynamic, sealed, dynamic_props)| {
                        Amf3Value::Object(Amf3Object {
                            class_name,
                            dynamic,
                            sealed,
                            dynamic_props: if dynamic { dynamic_props } else { vec![] },
                        })
                    }),
                (
                    any::<bool>(),
                    key(),
                    prop::collection::vec(inner.clone(), 0..4)
                )
                    .prop_map(|(fixed, type_name, items)| {
                        Amf3Value::VectorObject {
                            fixed,
                            type_name,
                            items,
                        }
                    }),
                (
                    any::<bool>(),
                    prop::collection::vec((inner.clone(), inner), 0..3)
                )
                    .prop_map(|(weak_keys, entries)| Amf3Value::Dictionary { weak_keys, entries }),
            ]
        })
    }

    proptest! {
        #[test]
        fn roundtrip(values in prop::collection::vec(arb_amf3(), 0..4)) {
            let b = encode_all(&values);
            prop_assert_eq!(decode_all(&b, &lim()).unwrap(), values);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_all(&b, &lim());
        }
    }
}
