//! One budget on the blocking pool for key work too costly for an executor thread: RTMPE's
//! Diffie-Hellman (`door::rtmpe`) and the RSA signatures of TLS handshakes in company
//! (`net::tls_stream`).
//!
//! Each costs about a millisecond of CPU or more on the machines measured (bench/RESULTS.md),
//! and tokio does not preempt, so both run on the blocking pool. Each had its own cap (RTMPE
//! half the cores, TLS signing one per core): a storm of both at once ran 1.5x the cores' worth
//! of key work beside the executor threads carrying the streams. Now every piece of it takes a
//! slot from one budget of one slot per core, and RTMPE takes its own first, at most half the
//! cores, so a flood of RTMPE hellos still leaves room for TLS clients. Waiting for a slot holds
//! no thread; the slot goes with the work onto its thread, so it frees when the work ends, even
//! when the handshake that asked for it gave up waiting meanwhile (its timeout).

use tokio::sync::{Semaphore, SemaphorePermit};

/// What a slot is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyWork {
    /// RTMPE's key exchange: two to four 1024-bit exponentiations.
    RtmpeKeyExchange,
    /// A TLS handshake step that signs with an RSA key.
    TlsSignature,
}

/// The budget: one slot per core for all key work, at most half of them for RTMPE.
#[derive(Debug)]
pub struct KeyWorkBudget {
    all: Semaphore,
    rtmpe: Semaphore,
}

/// A slot taken from a [`KeyWorkBudget`]; dropping it gives it back.
#[derive(Debug)]
pub struct KeyWorkSlot<'a> {
    _all: SemaphorePermit<'a>,
    _own: Option<SemaphorePermit<'a>>,
}

/// The budget is closed (the process is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the key-work slots are closed (shutting down)")]
pub struct Closed;

/// Why [`KeyWorkBudget::run`] returned no result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Closed(#[from] Closed),
    /// The blocking-pool thread running the work panicked or was cancelled.
    #[error(
        "the blocking-pool thread running it failed ({0}); a bug, or the runtime is shutting down"
    )]
    Worker(#[from] tokio::task::JoinError),
}

impl KeyWorkBudget {
    /// A budget for `cores` cores (at least one slot, and one for RTMPE).
    pub fn new(cores: usize) -> KeyWorkBudget {
        KeyWorkBudget {
            all: Semaphore::new(cores.max(1)),
            rtmpe: Semaphore::new((cores / 2).max(1)),
        }
    }

    /// Waits for a slot for `work` (in arrival order).
    pub async fn slot(&self, work: KeyWork) -> Result<KeyWorkSlot<'_>, Closed> {
        // The narrower cap first: an RTMPE hello waiting for its own share holds no slot of
        // the shared budget meanwhile.
        let own = match work {
            KeyWork::RtmpeKeyExchange => Some(self.rtmpe.acquire().await.map_err(|_| Closed)?),
            KeyWork::TlsSignature => None,
        };
        let all = self.all.acquire().await.map_err(|_| Closed)?;
        Ok(KeyWorkSlot {
            _all: all,
            _own: own,
        })
    }

    /// Runs `work` on the blocking pool once a slot for `kind` is free. The slot goes onto the
    /// work's thread with it, so it frees when `work` returns, not when the caller stops
    /// waiting: a handshake that times out while its exponentiation runs leaves the slot
    /// taken until the exponentiation ends, and the budget keeps counting the CPU in use.
    pub async fn run<T, F>(&'static self, kind: KeyWork, work: F) -> Result<T, RunError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let slot = self.slot(kind).await?;
        let done = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work()
        })
        .await?;
        Ok(done)
    }

    /// Slots free now, for every kind of work.
    pub fn free(&self) -> usize {
        self.all.available_permits()
    }
}

/// The cores this process may run on (2 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

/// The process's budget, sized to its cores.
pub fn budget() -> &'static KeyWorkBudget {
    static BUDGET: std::sync::OnceLock<KeyWorkBudget> = std::sync::OnceLock::new();
    BUDGET.get_or_init(|| KeyWorkBudget::new(cores()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use std::time::Duration;

    /// Running RTMPE and TLS work at once never exceeds one slot per core, and RTMPE never
    /// more than half of them; every piece of work gets its turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mixed_storm_runs_one_piece_of_key_work_per_core() {
        for cores in [1, 2, 4] {
            let budget: &'static KeyWorkBudget = Box::leak(Box::new(KeyWorkBudget::new(cores)));
            let running = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
            let most = Arc::new([
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            ]);
            let mut tasks = Vec::new();
            for i in 0..24 {
                let work = if i % 3 == 0 {
                    KeyWork::TlsSignature
                } else {
                    KeyWork::RtmpeKeyExchange
                };
                let (running, most) = (running.clone(), most.clone());
                tasks.push(tokio::spawn(async move {
                    let slot = budget.slot(work).await.unwrap();
                    tokio::task::spawn_blocking(move || {
                        let _slot = slot;
                        let kind = usize::from(work == KeyWork::RtmpeKeyExchange);
                        let mine = running[kind].fetch_add(1, SeqCst) + 1;
                        let all = running[0].load(SeqCst) + running[1].load(SeqCst);
                        most[kind].fetch_max(mine, SeqCst);
                        most[2].fetch_max(all, SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                        running[kind].fetch_sub(1, SeqCst);
                    })
                    .await
                    .unwrap();
                }));
            }
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(10), t)
                    .await
                    .expect("every piece of work got a slot")
                    .unwrap();
            }
            let [tls, rtmpe, all] = [0, 1, 2].map(|i| most[i].load(SeqCst));
            assert!(all <= cores, "{cores} cores: {all} pieces at once");
            assert!(
                rtmpe <= (cores / 2).max(1),
                "{cores} cores: {rtmpe} RTMPE at once"
            );
            assert!(tls >= 1 && rtmpe >= 1);
            assert_eq!(budget.free(), cores, "every slot given back");
        }
    }

    /// The work holds its slot: a caller that stops waiting (a handshake's timeout) frees
    /// nothing while the work still runs; the slot comes back when the work ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_stays_taken_while_its_work_runs_after_the_caller_gave_up() {
        let budget: &'static KeyWorkBudget = Box::leak(Box::new(KeyWorkBudget::new(2)));
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        let (began, running) = tokio::sync::oneshot::channel::<()>();
        let caller = tokio::spawn(tokio::time::timeout(
            Duration::from_millis(100),
            budget.run(KeyWork::RtmpeKeyExchange, move || {
                let _ = began.send(());
                let _ = finished.recv_timeout(Duration::from_secs(10));
            }),
        ));
        running.await.unwrap();
        assert!(caller.await.unwrap().is_err(), "the caller gave up waiting");
        assert_eq!(budget.free(), 1, "the work still runs: its slot is taken");
        finish.send(()).unwrap();
        let back = async {
            while budget.free() != 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), back)
            .await
            .expect("the slot comes back when the work ends");
    }

    /// RTMPE waits for its share (half the cores); TLS takes what is left of the budget.
    #[tokio::test]
    async fn rtmpe_waits_for_its_share_and_tls_does_not() {
        let budget = KeyWorkBudget::new(2);
        let a = budget.slot(KeyWork::RtmpeKeyExchange).await.unwrap();
        assert_eq!(budget.free(), 1);
        // RTMPE's share (one of two cores) is taken: a second RTMPE waits, TLS does not.
        let second = tokio::time::timeout(
            Duration::from_millis(20),
            budget.slot(KeyWork::RtmpeKeyExchange),
        );
        assert!(second.await.is_err(), "a second RTMPE slot on two cores");
        let b = budget.slot(KeyWork::TlsSignature).await.unwrap();
        assert_eq!(budget.free(), 0);
        drop(a);
        drop(b);
        assert_eq!(budget.free(), 2);
    }
}
