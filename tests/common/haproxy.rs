//! haproxy, for the PROXY protocol.

use super::*;

/// haproxy in TCP mode on a free 127.0.0.1 port, forwarding to `backend`; `bind_opts` go on
/// its `bind` line (`accept-proxy`: it reads a PROXY header) and `server_opts` on its `server`
/// line (`send-proxy-v2`: it sends one). Returns the process, its config directory and port.
pub fn haproxy_tcp(
    backend: SocketAddr,
    bind_opts: &str,
    server_opts: &str,
) -> (Proc, TempDir, u16) {
    let dir = temp_dir();
    let port = free_port();
    let conf = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 60s\n  timeout server 60s\nfrontend f\n  \
         bind 127.0.0.1:{port} {bind_opts}\n  default_backend b\nbackend b\n  \
         server s {backend} {server_opts}\n"
    );
    let path = dir.path().join("haproxy.cfg");
    fs::write(&path, conf).unwrap();
    let mut cmd = Command::new(&peers().haproxy);
    cmd.arg("-db").arg("-f").arg(&path);
    let mut proc = Proc::spawn("haproxy", cmd);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        wait_until(START_TIMEOUT, || accepts(addr) || !proc.is_running()) && proc.is_running(),
        "haproxy did not start: {}",
        proc.log()
    );
    (proc, dir, port)
}
