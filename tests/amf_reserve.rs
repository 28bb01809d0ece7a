//! AMF decoding reserves memory for what arrived, not for what was declared (issue 9 item 7):
//! 64 nested arrays each declaring 65,536 entries used to reserve about 64 x 65,536 values
//! up front (hundreds of MB of address space from a 66 KB message). Measured with a counting
//! allocator (this test binary's own), peak bytes on the decoding thread.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use rtmpgate::rtmp::amf0::{self, AmfLimits};
use rtmpgate::rtmp::amf3;

struct Counting;

thread_local! {
    static NOW: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn add(n: usize) {
    let _ = NOW.try_with(|now| {
        let v = now.get().saturating_add(n);
        now.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn sub(n: usize) {
    let _ = NOW.try_with(|now| now.set(now.get().saturating_sub(n)));
}

// SAFETY: delegates to the system allocator; the counters are thread-local plain cells
// (const-initialised, so counting never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        add(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        sub(l.size());
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        sub(l.size());
        add(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated on this thread while `f` runs, above what was held before.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = NOW.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get) - base
}

/// Nested arrays, each declaring `count` entries, then enough one-byte values that every
/// level's declared count fits in the bytes left (so the count check alone lets it through).
const LEVELS: usize = 63;
const DECLARED: u32 = 65_536;
/// Reserved (peak) bytes the decode of the ~66 KB attack may take: the values it really
/// decodes (65,536 at most, the entry limit) plus small reservations per level. Before the
/// fix the peak was LEVELS x DECLARED x the size of a value (hundreds of MB).
const MAX_PEAK: usize = 16 << 20;

#[test]
fn amf0_nested_strict_arrays_reserve_what_arrived() {
    let mut b = Vec::new();
    for _ in 0..LEVELS {
        b.push(amf0::marker::STRICT_ARRAY);
        b.extend_from_slice(&DECLARED.to_be_bytes());
    }
    b.resize(b.len() + DECLARED as usize + 16, amf0::marker::NULL);
    let limits = AmfLimits::default();
    let mut result = None;
    let peak = peak_of(|| result = Some(amf0::decode_all(&b, &limits).is_ok()));
    eprintln!(
        "AMF0: {} bytes in, {LEVELS} arrays declaring {DECLARED}: peak {peak} bytes allocated \
         (decode ok: {result:?})",
        b.len()
    );
    assert!(peak <= MAX_PEAK, "peak {peak} bytes > {MAX_PEAK}");
}

#[test]
fn amf3_nested_arrays_and_vectors_reserve_what_arrived() {
    let limits = AmfLimits::default();
    // Arrays (dense part), Vector.<Object> and Dictionary each reserved from the count.
    for m in [
        amf3::marker::ARRAY,
        amf3::marker::VECTOR_OBJECT,
        amf3::marker::DICTIONARY,
    ] {
        let mut b = BytesMut::new();
        for _ in 0..LEVELS {
            b.extend_from_slice(&[m]);
            amf3::put_u29(&mut b, (DECLARED << 1) | 1);
            match m {
                amf3::marker::ARRAY => b.extend_from_slice(&[0x01]), // no associative part
                amf3::marker::VECTOR_OBJECT => b.extend_from_slice(&[0, 0x01]), // not fixed, type ""
                _ => b.extend_from_slice(&[0]),                                 // strong keys
            }
        }
        b.resize(b.len() + 2 * DECLARED as usize + 16, amf3::marker::NULL);
        let mut result = None;
        let peak = peak_of(|| result = Some(amf3::decode_all(&b, &limits).is_ok()));
        eprintln!(
            "AMF3 marker {m:#04x}: {} bytes in, {LEVELS} containers declaring {DECLARED}: peak \
             {peak} bytes allocated (decode ok: {result:?})",
            b.len()
        );
        assert!(
            peak <= MAX_PEAK,
            "marker {m:#04x}: peak {peak} bytes > {MAX_PEAK}"
        );
    }
}
