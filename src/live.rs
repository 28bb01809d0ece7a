//! A setting read often and replaced rarely (by a configuration reload): readers take a
//! snapshot (an `Arc` clone under a read lock held for a few nanoseconds) at the moment a
//! connection or session starts and keep it, so a reload changes what new work sees and
//! never what running work already holds.

use std::sync::{Arc, RwLock};

use crate::stream::StreamHandler;

/// The current value of a reloadable setting.
#[derive(Debug, Default)]
pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    pub fn new(value: T) -> Self {
        Live(RwLock::new(Arc::new(value)))
    }

    pub fn from_arc(value: Arc<T>) -> Self {
        Live(RwLock::new(value))
    }

    /// The value now; later replacements do not change the returned snapshot.
    pub fn get(&self) -> Arc<T> {
        // A writer never panics while holding the lock (it only swaps an Arc), so a
        // poisoned lock still holds a whole value.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the value for every later [`Live::get`].
    pub fn set(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

/// A handler that passes each new stream to whatever handler `current` holds at that
/// moment: a reload swaps the engine generation or the upstream for new sessions while the
/// open ones keep running on the one they started with.
pub fn switchable(current: Arc<Live<StreamHandler>>) -> StreamHandler {
    Arc::new(move |stream| {
        let handler = current.get();
        handler(stream)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_survive_a_replacement() {
        let live = Live::new(1u32);
        let before = live.get();
        live.set(Arc::new(2));
        assert_eq!(*before, 1);
        assert_eq!(*live.get(), 2);
    }
}
