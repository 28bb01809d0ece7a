//! The access log (`[log] access = PATH`, `--access-log PATH`): one JSON line per session
//! close (who, over what, which stream, bytes each way, how long), for billing and audits.
//!
//! Lines go through a bounded queue to a writer thread, so a slow disk never blocks a session's
//! task; when the queue is full a line is dropped and counted (reported in the next line
//! written and in `rtmpgate_access_log_dropped_total`). SIGHUP reopens the file, so logrotate
//! can move it away (`postrotate systemctl reload rtmpgate` / `kill -HUP`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Lines waiting for the writer thread at most.
pub const QUEUE_LINES: usize = 4096;

enum Msg {
    Line(Vec<u8>),
    Reopen,
}

struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
}

static LOG: OnceLock<AccessLog> = OnceLock::new();

/// Lines dropped because the writer fell behind (for metrics).
pub fn dropped() -> u64 {
    LOG.get().map_or(0, |l| l.dropped.load(Ordering::Relaxed))
}

/// Opens `path` for appending (created 0640 where the platform allows) and starts the writer.
/// Called once at start; a second call is an error.
pub fn open(path: &Path) -> anyhow::Result<()> {
    let file = open_file(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the access log {} ([log] access / --access-log): {e}; check the \
             directory exists and is writable by this user",
            path.display()
        )
    })?;
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("rtmpgate-access-log".into())
        .spawn(move || writer(rx, path, file))?;
    LOG.set(AccessLog {
        tx,
        dropped: AtomicU64::new(0),
    })
    .map_err(|_| anyhow::anyhow!("the access log is already open"))
}

/// Asks the writer to reopen the file (after logrotate moved it).
pub fn reopen() {
    if let Some(log) = LOG.get() {
        let _ = log.tx.try_send(Msg::Reopen);
    }
}

fn open_file(path: &Path) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o640);
    }
    o.open(path)
}

fn writer(rx: Receiver<Msg>, path: PathBuf, file: File) {
    let mut out = BufWriter::new(file);
    loop {
        // Block for the first message, then take what is queued before one flush.
        let Ok(first) = rx.recv() else {
            let _ = out.flush();
            return;
        };
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(l) => {
                    if let Err(e) = out.write_all(&l) {
                        tracing::warn!("access log {}: write failed: {e}", path.display());
                    }
                }
                Msg::Reopen => {
                    let _ = out.flush();
                    match open_file(&path) {
                        Ok(f) => {
                            out = BufWriter::new(f);
                            tracing::info!("access log {} reopened", path.display());
                        }
                        Err(e) => tracing::error!(
                            "access log {}: reopening failed, still writing to the old file: {e}",
                            path.display()
                        ),
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// One session close, as written.
#[derive(Serialize)]
pub struct Entry<'a> {
    pub time: String,
    pub id: u64,
    pub transport: &'static str,
    pub peer: String,
    pub listener: String,
    pub app: Option<&'a str>,
    pub name: Option<&'a str>,
    pub role: Option<&'static str>,
    pub upstream: Option<&'a str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_secs: f64,
    /// "closed", or "kicked" (through the admin API).
    pub end: &'static str,
    /// Lines dropped since the last one written (the writer fell behind), when any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_before: Option<u64>,
}

/// True when an access log is open (so callers can skip building the entry).
pub fn enabled() -> bool {
    LOG.get().is_some()
}

/// Queues one line; never blocks.
pub fn record(mut entry: Entry<'_>) {
    let Some(log) = LOG.get() else {
        return;
    };
    let dropped = log.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        entry.dropped_before = Some(dropped);
    }
    let Ok(mut line) = serde_json::to_vec(&entry) else {
        return;
    };
    line.push(b'\n');
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
        log.tx.try_send(Msg::Line(line))
    {
        log.dropped
            .fetch_add(dropped.saturating_add(1), Ordering::Relaxed);
    }
}

/// `2026-12-01T21:30:05.123Z` for a time since the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_250); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.250Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599); // 2026-12-31T23:59:59
        assert_eq!(rfc3339(t), "2026-12-31T23:59:59.000Z");
    }
}
