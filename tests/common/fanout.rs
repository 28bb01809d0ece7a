//! One publisher, several players.

use super::*;

/// A kind of player.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlayerKind {
    /// Debian's ffmpeg 5.1.
    Ffmpeg,
    /// The static ffmpeg from imageio-ffmpeg (rtmpe, rtmpte).
    StaticFfmpeg,
    /// rtmpdump 2.4.
    Rtmpdump,
}

impl PlayerKind {
    /// How much of the source's end this player may miss, in ms: its shortfall straight
    /// from nginx-rtmp (`baseline_nginx_direct`), plus a stated margin. rtmpdump writes every
    /// packet (the last may be cut short, which leaves one packet, under 50 ms, unmatched).
    /// ffmpeg 5.1 stopped by the harness drops what it still had buffered: 0.47 s of video
    /// and 0.53 s of audio in every run measured (136/150 video, 192/217 audio packets of a
    /// 5 s source); 700 ms allows five more audio packets. The static ffmpeg is held to the
    /// same figure.
    pub fn max_tail_ms(self) -> i64 {
        match self {
            PlayerKind::Ffmpeg | PlayerKind::StaticFfmpeg => 700,
            PlayerKind::Rtmpdump => 50,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PlayerKind::Ffmpeg => "ffmpeg",
            PlayerKind::StaticFfmpeg => "static ffmpeg",
            PlayerKind::Rtmpdump => "rtmpdump",
        }
    }

    /// Starts this player on `url`, writing FLV to `out`. ffmpeg logs at debug level so the
    /// harness can see when it has sent `play`.
    pub fn start(self, url: &str, out: &Path) -> Proc {
        match self {
            PlayerKind::Rtmpdump => play_rtmpdump(url, out),
            PlayerKind::Ffmpeg | PlayerKind::StaticFfmpeg => {
                let bin = if self == PlayerKind::Ffmpeg {
                    &peers().ffmpeg
                } else {
                    &peers().static_ffmpeg
                };
                let mut cmd = Command::new(bin);
                cmd.args(["-nostdin", "-hide_banner", "-loglevel", "debug", "-y"])
                    .args(["-rw_timeout", &(PLAYER_IDLE_SECS * 1_000_000).to_string()])
                    .args(["-i", url, "-c", "copy", "-f", "flv"])
                    .arg(out);
                Proc::spawn(&format!("{} player of {url}", self.name()), cmd)
            }
        }
    }

    /// The log line that says the player has asked to play.
    pub(crate) fn ready_marker(self) -> &'static str {
        match self {
            PlayerKind::Rtmpdump => "Starting Live Stream",
            _ => "Sending play command",
        }
    }
}

/// What one player received.
#[derive(Debug)]
pub struct Received {
    /// "ffmpeg over rtmpt://127.0.0.1:PORT/live/x".
    pub label: String,
    pub kind: PlayerKind,
    pub file: PathBuf,
    pub frames: Vec<Frame>,
    /// True if the player ended by itself (rather than being killed at the deadline).
    pub exited: bool,
}

impl Received {
    /// Asserts the received packets are the README's "frames": one contiguous run of `src`
    /// from its first packet to within the player's baseline shortfall of its end
    /// ([`assert_whole_run`], [`PlayerKind::max_tail_ms`]).
    pub fn assert_run_of(&self, src: &[Frame]) -> RunReport {
        assert_whole_run(&self.label, src, &self.frames, self.kind.max_tail_ms())
    }
}

/// Starts every player on its URL, waits until each has asked to play, publishes `source`
/// with `publisher` (an ffmpeg binary) to `publish_url`, waits for the publisher to finish,
/// then for the players to end by themselves (at most [`PLAYER_TAIL`], then they are killed).
/// Output files go to `dir`. Fails the test if a player never asks to play or the publisher
/// fails.
pub fn publish_and_play(
    dir: &Path,
    publisher: &Path,
    publish_url: &str,
    source: &Path,
    players: &[(PlayerKind, String)],
) -> Vec<Received> {
    publish_and_play_when(dir, publisher, publish_url, source, players, || true)
}

/// [`publish_and_play`], with one more condition before the publisher starts: `server_ready`
/// must hold (polled up to [`START_TIMEOUT`]), e.g. the server has logged every player's play
/// command, so no player can miss the start on a loaded machine.
pub fn publish_and_play_when(
    dir: &Path,
    publisher: &Path,
    publish_url: &str,
    source: &Path,
    players: &[(PlayerKind, String)],
    server_ready: impl FnMut() -> bool,
) -> Vec<Received> {
    let mut running: Vec<(PlayerKind, String, PathBuf, Proc)> = players
        .iter()
        .enumerate()
        .map(|(i, (kind, url))| {
            let out = dir.join(format!("player{i}.flv"));
            let proc = kind.start(url, &out);
            (*kind, url.clone(), out, proc)
        })
        .collect();
    for (kind, url, _, proc) in running.iter_mut() {
        let marker = kind.ready_marker();
        let ready = wait_until(START_TIMEOUT, || {
            proc.log_tail().contains(marker) || !proc.is_running()
        });
        assert!(
            ready && proc.is_running(),
            "{} player of {url} did not get as far as asking to play (no `{marker}` within \
             {START_TIMEOUT:?}); its output:\n{}",
            kind.name(),
            proc.log()
        );
    }
    assert!(
        wait_until(START_TIMEOUT, server_ready),
        "the server was not ready for the publisher within {START_TIMEOUT:?}"
    );
    // The play command may still have to travel through the gateway to the server.
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut publ = publish(publisher, publish_url, source);
    // Real time: the media's length, plus room for a loaded machine.
    let limit = media_seconds(source).map_or(Duration::from_secs(60), |s| {
        Duration::from_secs(60).max(Duration::from_secs_f64(s + 30.0))
    });
    let status = publ.wait_timeout(limit);
    assert!(
        status.is_some_and(|s| s.success()),
        "publisher to {publish_url} ended with {status:?}; its output:\n{}",
        publ.log()
    );
    eprintln!(
        "published {} to {publish_url} in {:.1} s",
        source.display(),
        started.elapsed().as_secs_f64()
    );
    let ended = Instant::now();
    let deadline = ended + PLAYER_TAIL;
    // Stopped side by side, so a run costs the media's duration plus one quiet period.
    let exits: Vec<bool> = thread::scope(|scope| {
        let handles: Vec<_> = running
            .iter_mut()
            .map(|(_, _, out, proc)| scope.spawn(move || finish_player(proc, out, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .collect()
    });
    running
        .into_iter()
        .zip(exits)
        .map(|((kind, url, out, proc), exited)| {
            eprintln!(
                "{} over {url}: {} ({:?})",
                kind.name(),
                if exited {
                    "ended by itself"
                } else {
                    "stopped by the harness"
                },
                proc.status
            );
            Received {
                label: format!("{} over {url}", kind.name()),
                kind,
                frames: framemd5(&out),
                file: out,
                exited,
            }
        })
        .collect()
}

/// Lets a player end by itself; once its output file has not grown for [`PLAYER_QUIET`] (the
/// stream is over; neither ffmpeg nor rtmpdump ends at nginx-rtmp's unpublish notice, they
/// wait for their idle timeout) it gets SIGINT, on which both finish their file; SIGKILL at
/// `deadline`. True if it ended by itself.
pub(crate) fn finish_player(proc: &mut Proc, out: &Path, deadline: Instant) -> bool {
    let size = || fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let mut last = (size(), Instant::now());
    while Instant::now() < deadline {
        if !proc.is_running() {
            return true;
        }
        let now = size();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= PLAYER_QUIET {
            // ffmpeg takes the first SIGINT as "finish up" but only interrupts a blocking
            // read on the second; rtmpdump finishes on the first and ignores the second.
            proc.signal("INT");
            if proc.wait_timeout(Duration::from_millis(300)).is_none() {
                proc.signal("INT");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            proc.wait_or_kill(left.min(Duration::from_secs(5)));
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    proc.kill();
    false
}
