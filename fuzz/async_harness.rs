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

/// Writes one piece of a client's bytes to the target, within `hang` of virtual time. A
/// write error means the target closed the connection (a refused input): the client is done
/// (`wr` becomes None). A write that never completes is a hang.
#[allow(dead_code)] // not every target that includes this file writes pieces
pub async fn write_piece<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut Option<W>,
    bytes: &[u8],
    hang: std::time::Duration,
    who: &str,
) {
    use tokio::io::AsyncWriteExt as _;
    let Some(w) = wr.as_mut() else { return };
    match tokio::time::timeout(hang, w.write_all(bytes)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => *wr = None,
        Err(_) => panic!("{who} took no bytes for {hang:?}"),
    }
}
