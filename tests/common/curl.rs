//! curl, for the tunnel by hand.

use super::*;

/// One HTTP reply as curl saw it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// The response head as sent (status line and headers).
    pub head: String,
    pub body: Vec<u8>,
}

/// POSTs `body` to `url` with curl (`-k` for https: the dev certificate), bounded to 10 s.
/// Returns None if curl could not get a reply at all (connection refused or reset, timeout).
pub fn curl_post(url: &str, body: &[u8]) -> Option<HttpReply> {
    let dir = temp_dir();
    let req = dir.path().join("request.bin");
    let head = dir.path().join("head.txt");
    let resp = dir.path().join("body.bin");
    fs::write(&req, body).expect("cannot write the request body");
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "-k", "--max-time", "10", "-X", "POST"])
        .args(["-H", "Content-Type: application/x-fcs"])
        .arg("--data-binary")
        .arg(format!("@{}", req.display()))
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&resp)
        .args(["-w", "%{http_code}", url]);
    let (status, out, _) = run_capture(&mut cmd, Duration::from_secs(15));
    let code: u16 = String::from_utf8_lossy(&out).trim().parse().unwrap_or(0);
    if !status.is_some_and(|s| s.success()) || code == 0 {
        return None;
    }
    Some(HttpReply {
        status: code,
        head: fs::read_to_string(&head).unwrap_or_default(),
        body: fs::read(&resp).unwrap_or_default(),
    })
}
