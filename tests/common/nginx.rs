//! nginx with its RTMP module, as a backend and a reference server.

use super::*;

/// nginx with its RTMP module on a loopback port, `application live`; one process
/// (`master_process off`), so killing it leaves no orphaned worker.
pub struct Nginx {
    pub(crate) proc: Proc,
    pub(crate) dir: TempDir,
    pub(crate) port: u16,
}

impl Nginx {
    pub fn start() -> Nginx {
        Nginx::start_with_listen_options("")
    }

    /// With extra parameters on its `listen` line, e.g. "proxy_protocol".
    pub fn start_with_listen_options(options: &str) -> Nginx {
        Nginx::launch(None, options)
    }

    /// On a given port (a backend restarting where it was).
    pub fn start_on_port(port: u16) -> Nginx {
        Nginx::launch(Some(port), "")
    }

    pub(crate) fn launch(fixed_port: Option<u16>, options: &str) -> Nginx {
        let (proc, dir, port) = spawn_nginx_rtmp(fixed_port, |d, port| {
            format!(
                "load_module {module};\n\
                 worker_processes 1; daemon off; master_process off;\n\
                 error_log {d}/error.log warn; pid {d}/nginx.pid;\n\
                 events {{ worker_connections 4096; }}\n\
                 rtmp {{ server {{ listen 127.0.0.1:{port} {options}; chunk_size 4096;\n  \
                 application live {{ live on; record off; }} }} }}\n",
                module = peers().nginx_rtmp_module.display(),
                d = d.display(),
            )
        });
        Nginx { proc, dir, port }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `rtmp://127.0.0.1:PORT`, the value for `--upstream`.
    pub fn upstream(&self) -> String {
        format!("rtmp://127.0.0.1:{}", self.port)
    }

    /// `rtmp://127.0.0.1:PORT/PATH`, e.g. `url("live/test")`.
    pub fn url(&self, path: &str) -> String {
        format!("rtmp://127.0.0.1:{}/{}", self.port, path)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Connections nginx has open from clients (the gateway's upstream legs, for example).
    pub fn clients(&self) -> usize {
        established_on(self.port)
    }

    /// nginx's error.log so far.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Kills it at once (a backend dying mid-stream).
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.proc.kill();
        if thread::panicking() {
            eprintln!("---- nginx error.log ----\n{}", self.error_log());
        }
    }
}

/// Starts nginx with its RTMP module from the configuration `conf(dir, port)` writes (its
/// own temporary directory; a free loopback port unless `fixed_port`), waits until it
/// accepts, and retries on another port when a concurrent test took it between
/// `free_port()` and nginx's bind. Panics with nginx's output if it never starts.
pub fn spawn_nginx_rtmp(
    fixed_port: Option<u16>,
    conf: impl Fn(&Path, u16) -> String,
) -> (Proc, TempDir, u16) {
    let p = peers();
    let mut last = String::new();
    for _ in 0..4 {
        let dir = temp_dir();
        let port = fixed_port.unwrap_or_else(free_port);
        let conf_path = dir.path().join("nginx.conf");
        fs::write(&conf_path, conf(dir.path(), port)).expect("cannot write nginx.conf");
        let mut cmd = Command::new(&p.nginx);
        cmd.arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"));
        let mut proc = Proc::spawn("nginx", cmd);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let up = wait_until(START_TIMEOUT, || accepts(addr) || !proc.is_running());
        if up && proc.is_running() {
            return (proc, dir, port);
        }
        proc.kill();
        last = format!(
            "{}{}",
            proc.log(),
            fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
    }
    panic!("nginx-rtmp did not start; its output:\n{last}");
}
