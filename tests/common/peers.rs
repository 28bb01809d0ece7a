//! Finding the real peers (ffmpeg, rtmpdump, nginx, stunnel, haproxy, curl) and their versions.

use super::*;

/// Paths of the real programs the tests drive.
#[derive(Debug)]
pub struct Peers {
    /// Debian's ffmpeg 5.1: rtmp, rtmps, rtmpt, rtmpts.
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
    /// rtmpdump 2.4 (librtmp): rtmp, rtmpt, rtmpe, rtmpte, rtmps.
    pub rtmpdump: PathBuf,
    pub nginx: PathBuf,
    /// nginx's RTMP module (libnginx-mod-rtmp), loaded by the generated config.
    pub nginx_rtmp_module: PathBuf,
    pub stunnel: PathBuf,
    /// haproxy, the L4 proxy users would pick (PROXY protocol tests, benchmarks).
    pub haproxy: PathBuf,
    pub curl: PathBuf,
    pub openssl: PathBuf,
    /// The static ffmpeg from the imageio-ffmpeg wheel: all six schemes, rtmpe and rtmpte too.
    pub static_ffmpeg: PathBuf,
}

/// The peers, looked up once per test binary. Panics (fails the test) naming every missing
/// one and how to install it.
pub fn peers() -> &'static Peers {
    static PEERS: OnceLock<Result<Peers, String>> = OnceLock::new();
    match PEERS.get_or_init(Peers::find) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

impl Peers {
    pub(crate) fn find() -> Result<Peers, String> {
        let mut missing = Vec::new();
        let mut get = |name: &str, pkg: &str| match which(name) {
            Some(p) => p,
            None => {
                missing.push(format!("{name} (package {pkg})"));
                PathBuf::new()
            }
        };
        let ffmpeg = get("ffmpeg", "ffmpeg");
        let ffprobe = get("ffprobe", "ffmpeg");
        let rtmpdump = get("rtmpdump", "rtmpdump");
        let nginx = get("nginx", "nginx");
        let stunnel = get("stunnel4", "stunnel4");
        let haproxy = get("haproxy", "haproxy");
        let curl = get("curl", "curl");
        let openssl = get("openssl", "openssl");
        let nginx_rtmp_module = [
            "/usr/lib/nginx/modules/ngx_rtmp_module.so",
            "/usr/lib64/nginx/modules/ngx_rtmp_module.so",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
        if nginx_rtmp_module.is_none() {
            missing.push("the nginx RTMP module (package libnginx-mod-rtmp)".into());
        }
        let static_ffmpeg = find_static_ffmpeg();
        if static_ffmpeg.is_none() {
            missing.push(
                "the static ffmpeg from the PyPI wheel imageio-ffmpeg (in /opt/imageio-venv, \
                 target/peers/venv, $RTMPGATE_PEERS_VENV or $RTMPGATE_STATIC_FFMPEG)"
                    .into(),
            );
        }
        if !missing.is_empty() {
            return Err(format!(
                "missing test peers: {}; {INSTALL_HINT}",
                missing.join(", ")
            ));
        }
        Ok(Peers {
            ffmpeg,
            ffprobe,
            rtmpdump,
            nginx,
            nginx_rtmp_module: nginx_rtmp_module.unwrap_or_default(),
            stunnel,
            haproxy,
            curl,
            openssl,
            static_ffmpeg: static_ffmpeg.unwrap_or_default(),
        })
    }
}

/// Looks a program up on PATH and in the sbin directories a non-root PATH often lacks.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub(crate) fn find_static_ffmpeg() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RTMPGATE_STATIC_FFMPEG") {
        let p = PathBuf::from(p);
        return is_executable(&p).then_some(p);
    }
    let mut venvs = Vec::new();
    if let Some(v) = std::env::var_os("RTMPGATE_PEERS_VENV") {
        venvs.push(PathBuf::from(v));
    }
    venvs.push(PathBuf::from("/opt/imageio-venv"));
    venvs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/venv"));
    for venv in venvs {
        let Ok(libs) = fs::read_dir(venv.join("lib")) else {
            continue;
        };
        for lib in libs.flatten() {
            if !lib.file_name().to_string_lossy().starts_with("python3") {
                continue;
            }
            let bins = lib.path().join("site-packages/imageio_ffmpeg/binaries");
            let Ok(entries) = fs::read_dir(&bins) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if e.file_name().to_string_lossy().starts_with("ffmpeg-") && is_executable(&p) {
                    return Some(p);
                }
            }
        }
    }
    None
}
