//! Child processes: started with a guard that kills them, their output kept for failure reports.

use super::*;

/// The last lines a process wrote to stdout and stderr, shared with the reader threads.
#[derive(Clone, Default)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

pub(crate) const LOG_LINES: usize = 20_000;

impl LogTail {
    pub(crate) fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= LOG_LINES {
            q.pop_front();
        }
        q.push_back(line);
    }

    /// Everything kept so far, one line each.
    pub fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = String::new();
        for l in q.iter() {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// The lines kept so far.
    pub fn lines(&self) -> Vec<String> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().cloned().collect()
    }

    /// True if any line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().any(|l| l.contains(needle))
    }

    pub(crate) fn follow(&self, pipe: impl Read + Send + 'static) {
        let tail = self.clone();
        thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        // Split on '\r' too: rtmpdump redraws its progress line with it.
                        let text = String::from_utf8_lossy(&buf);
                        for piece in text.split(['\r', '\n']).filter(|p| !p.is_empty()) {
                            tail.push(strip_ansi(piece));
                        }
                    }
                }
            }
        });
    }
}

/// Removes terminal colour escapes (ESC [ ... letter) from a log line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A child process that is killed (SIGKILL) when dropped, with its output kept; the output
/// is printed when the test is failing, so the reason is in the test's report.
pub struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) log: LogTail,
    pub(crate) status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let log = LogTail::default();
        if let Some(out) = child.stdout.take() {
            log.follow(out);
        }
        if let Some(err) = child.stderr.take() {
            log.follow(err);
        }
        Proc {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    /// Starts `cmd` with stdin closed, stdout written to `out` and stderr captured.
    pub fn spawn_to(name: &str, mut cmd: Command, out: fs::File) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let log = LogTail::default();
        if let Some(err) = child.stderr.take() {
            log.follow(err);
        }
        Proc {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The output kept so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    pub fn log_tail(&self) -> &LogTail {
        &self.log
    }

    /// The exit status if it has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for it to exit; None if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// Waits up to `timeout`, then kills it if it is still running. True if it exited by
    /// itself.
    pub fn wait_or_kill(&mut self, timeout: Duration) -> bool {
        if self.wait_timeout(timeout).is_some() {
            return true;
        }
        self.kill();
        false
    }

    /// Sends a signal by name (TERM, INT, KILL, STOP...).
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let text = self.log.text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(60);
            eprintln!(
                "---- {} (pid {}, {:?}): last {} lines of its output ----\n{}\n---- end of {} ----",
                self.name,
                self.child.id(),
                self.status,
                lines.len() - from,
                lines[from..].join("\n"),
                self.name
            );
        }
    }
}
