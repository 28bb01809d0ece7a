//! What the targets that run async code share: a runtime on tokio's paused clock, and an
//! input split into several peers' byte streams.

/// A current-thread runtime whose clock is paused: timers advance virtual time only, so
/// a target's waits (timeouts, pacing, long polls) cost no real time.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// `data` cut at each `sep`, into at most `max` parts (the last keeps any later `sep`).
#[allow(dead_code)] // not every target that includes this file splits its input
pub fn split_on<'a>(mut data: &'a [u8], sep: &[u8], max: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while out.len() + 1 < max {
        match data.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                out.push(&data[..i]);
                data = &data[i + sep.len()..];
            }
            None => break,
        }
    }
    out.push(data);
    out
}
