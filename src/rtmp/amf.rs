//! What the AMF0 and AMF3 decoders share: their limits, their errors, the bounds-checked
//! reader and the per-decode budget. Both decoders depend on this module and AMF0 on AMF3
//! (for the AVM+ switch), never the reverse.

/// Nesting depth above which even a configured limit is not honoured: each level is a
/// few stack frames (measured: 256 levels fit in a 2 MiB stack in a debug build, 400 do
/// not), and session tasks run on threads with 2 MiB stacks.
pub const HARD_MAX_DEPTH: usize = 128;

/// Limits applied while decoding one AMF payload (AMF0 and any AMF3 inside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmfLimits {
    /// Nesting depth of objects and arrays (capped at [`HARD_MAX_DEPTH`]).
    pub max_depth: usize,
    /// Values in one decoded payload, all containers together. A per-container count
    /// alone would still let one payload of one-byte values expand 50-fold in memory.
    pub max_entries: usize,
    /// Bytes in one string (also XML, byte arrays).
    pub max_string: usize,
    /// Bytes materialised by one decode: every string byte, including those copied out
    /// of AMF3 string and trait references (which would otherwise turn a few bytes of
    /// input into gigabytes of output).
    pub max_total: usize,
}

impl Default for AmfLimits {
    /// The values `limits.rs` defaults to (a test there keeps the two equal).
    fn default() -> Self {
        AmfLimits {
            max_depth: 64,
            max_entries: 65_536,
            max_string: 1024 * 1024,
            max_total: 16 * 1024 * 1024,
        }
    }
}

/// Why an AMF payload was refused. Offsets are from the start of the decoded buffer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AmfError {
    #[error("AMF data ends early at offset {at}: {needed} more bytes needed (truncated message?)")]
    Truncated { at: usize, needed: usize },
    #[error(
        "AMF{version} type marker 0x{marker:02x} at offset {at} is unknown or not allowed here"
    )]
    UnknownMarker { version: u8, marker: u8, at: usize },
    #[error("AMF nesting deeper than {limit} levels at offset {at} (raise limits.max_amf_depth if legitimate)")]
    TooDeep { limit: usize, at: usize },
    #[error("AMF payload has more than {limit} values (limits.max_amf_entries)")]
    TooManyEntries { limit: usize },
    #[error("AMF string of {len} bytes at offset {at} exceeds limits.max_amf_string ({limit})")]
    StringTooLong { len: usize, limit: usize, at: usize },
    #[error("AMF count {count} at offset {at} exceeds the {remaining} bytes left")]
    CountExceedsInput {
        count: usize,
        remaining: usize,
        at: usize,
    },
    #[error("AMF payload expands to more than {limit} bytes of strings (references?)")]
    TooLarge { limit: usize },
    #[error("AMF{version} {kind} reference {index} at offset {at} points past the {known} known entries")]
    BadReference {
        version: u8,
        kind: &'static str,
        index: u32,
        known: usize,
        at: usize,
    },
    #[error("AMF object at offset {at}: empty key not followed by the object-end marker")]
    MissingObjectEnd { at: usize },
    #[error("AMF3 externalizable class {class:?} at offset {at} is not supported")]
    Externalizable { class: String, at: usize },
}

/// Bounds-checked cursor shared by the AMF0 and AMF3 decoders.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], AmfError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end.and_then(|e| self.buf.get(self.pos..e).map(|s| (e, s))) {
            Some((e, s)) => {
                self.pos = e;
                Ok(s)
            }
            None => Err(AmfError::Truncated {
                at: self.pos,
                needed: n.saturating_sub(self.remaining()),
            }),
        }
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], AmfError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, AmfError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, AmfError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, AmfError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn f64(&mut self) -> Result<f64, AmfError> {
        Ok(f64::from_be_bytes(self.array()?))
    }
}

/// Per-decode accounting: entries, materialised bytes, depth.
pub(crate) struct Budget<'l> {
    pub(crate) limits: &'l AmfLimits,
    entries: usize,
    bytes: usize,
}

impl<'l> Budget<'l> {
    pub(crate) fn new(limits: &'l AmfLimits) -> Self {
        Budget {
            limits,
            entries: 0,
            bytes: 0,
        }
    }
    pub(crate) fn entry(&mut self) -> Result<(), AmfError> {
        self.entries = self.entries.saturating_add(1);
        if self.entries > self.limits.max_entries {
            return Err(AmfError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<(), AmfError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.limits.max_total {
            return Err(AmfError::TooLarge {
                limit: self.limits.max_total,
            });
        }
        Ok(())
    }
    pub(crate) fn depth(&self, depth: usize, at: usize) -> Result<(), AmfError> {
        if depth >= self.limits.max_depth.min(HARD_MAX_DEPTH) {
            return Err(AmfError::TooDeep {
                limit: self.limits.max_depth.min(HARD_MAX_DEPTH),
                at,
            });
        }
        Ok(())
    }
    /// Checks a declared string length, then takes and converts it.
    pub(crate) fn string(&mut self, r: &mut Reader<'_>, len: usize) -> Result<String, AmfError> {
        let bytes = self.raw(r, len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    /// Checks a declared byte length against the limit and the input, then takes it.
    pub(crate) fn raw<'a>(&mut self, r: &mut Reader<'a>, len: usize) -> Result<&'a [u8], AmfError> {
        if len > self.limits.max_string {
            return Err(AmfError::StringTooLong {
                len,
                limit: self.limits.max_string,
                at: r.pos(),
            });
        }
        let s = r.take(len)?;
        self.bytes(len)?;
        Ok(s)
    }
    /// Checks a declared element count against the input, given the smallest encoding of
    /// one element; returns how many entries to reserve up front: at most
    /// [`PREALLOC_ENTRIES`], so a declared count never sizes an allocation (nested arrays
    /// each declaring 65,536 entries reserved 330 MB from a 66 KB message). The vector grows
    /// as entries really arrive.
    pub(crate) fn count(
        &self,
        r: &Reader<'_>,
        count: usize,
        min_each: usize,
    ) -> Result<usize, AmfError> {
        if count.saturating_mul(min_each) > r.remaining() {
            return Err(AmfError::CountExceedsInput {
                count,
                remaining: r.remaining(),
                at: r.pos(),
            });
        }
        if count > self.limits.max_entries {
            return Err(AmfError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        Ok(count.min(PREALLOC_ENTRIES))
    }
}

/// Entries reserved up front for a container's declared count (the rest as they arrive).
pub(crate) const PREALLOC_ENTRIES: usize = 64;
