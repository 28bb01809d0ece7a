//! What the codec needs from a memory budget: a charge it grows before a buffer grows and
//! shrinks when the buffer leaves, refused with [`OverBudget`]. The budget itself (process-wide,
//! per address) lives in the application (rtmpgate's `budget` module implements
//! [`BufferCharge`] for its `Charge`); this crate only asks.

use std::fmt;

/// A charge was refused: taking `requested` more bytes would pass the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub struct OverBudget {
    pub requested: usize,
    pub used: usize,
    pub limit: usize,
    /// It was the address's share that was spent, not the process's.
    pub per_address: bool,
    /// What to do next, in the application's own terms (the setting to raise), appended to
    /// the message in parentheses; empty for none. This crate knows no configuration.
    pub remedy: &'static str,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whose, by) = if self.per_address {
            (" of this address", " by its connections")
        } else {
            ("", "")
        };
        write!(
            f,
            "memory budget{whose} spent: {} more bytes wanted, {} of {} in use{by}",
            self.requested, self.used, self.limit
        )?;
        if !self.remedy.is_empty() {
            write!(f, " ({})", self.remedy)?;
        }
        Ok(())
    }
}

/// Bytes held from a budget on behalf of one buffer owner; returned when it is dropped.
pub trait BufferCharge: fmt::Debug + Send + Sync {
    /// Takes `more` bytes, or refuses and keeps what it had.
    fn try_grow(&mut self, more: usize) -> Result<(), OverBudget>;
    /// Returns up to `less` bytes.
    fn shrink(&mut self, less: usize);
    /// Bytes held now.
    fn bytes(&self) -> usize;
}

/// A charge on no budget: counts, never refuses (tools, tests, fuzzing; the gateway charges
/// its real budget through [`crate::chunk::ChunkDecoder::with_charge`]).
#[derive(Debug, Default)]
pub struct Unmetered {
    bytes: usize,
}

impl BufferCharge for Unmetered {
    fn try_grow(&mut self, more: usize) -> Result<(), OverBudget> {
        self.bytes = self.bytes.saturating_add(more);
        Ok(())
    }

    fn shrink(&mut self, less: usize) {
        self.bytes -= less.min(self.bytes);
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}
