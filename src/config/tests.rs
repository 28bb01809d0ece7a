//! The merge of flags over the file, through `Config::merge` as `main` calls it: defaults,
//! precedence, relative paths, and that every error names its key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use clap::Parser;

use super::*;
use crate::net::proxy_protocol::ProxyVersion;
use crate::net::url::Scheme;

fn cli(args: &[&str]) -> Cli {
    let mut all = vec!["rtmpgate"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all).unwrap()
}

fn merge(args: &[&str], toml_text: &str) -> Result<Config, ConfigError> {
    let file = parse_file(toml_text, Path::new("test.toml"))?;
    Config::merge(&cli(args), file, Some(Path::new("/etc/rtmpgate")), || None)
}

#[test]
fn defaults() {
    let c = merge(&[], "").unwrap();
    let urls: Vec<String> = c.listen.iter().map(ToString::to_string).collect();
    assert_eq!(urls, DEFAULT_LISTEN);
    assert_eq!(c.tls.unwrap().default, [CertSource::EmbeddedDev]);
    assert!(c.upstream.is_none());
    assert!(c.rtmpe);
    assert_eq!(c.drain, Duration::from_secs(10));
}

#[test]
fn log_format_from_file_and_flag() {
    let c = merge(&[], "log_format = \"json\"").unwrap();
    assert_eq!(c.log_format, LogFormat::Json);
    let c = merge(&["--log-format", "text"], "log_format = \"json\"").unwrap();
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(merge(&[], "").unwrap().log_format, LogFormat::Text);
    assert!(merge(&[], "log_format = \"xml\"").is_err());
}

#[test]
fn flags_win_over_file() {
    let toml_text = r#"
        listen = ["rtmp://127.0.0.1:1935"]
        log_level = "debug"
        drain_secs = 30
        rtmpe = true
        [upstream]
        url = "rtmp://10.0.0.1:1935"
        proxy_protocol = "v1"
        [limits]
        max_connections = 5
    "#;
    let c = merge(
        &[
            "--listen",
            "rtmps://127.0.0.1:0",
            "--upstream",
            "rtmps://10.0.0.2",
            "--upstream-proxy-protocol",
            "v2",
            "--drain-secs",
            "3",
            "--no-rtmpe",
        ],
        toml_text,
    )
    .unwrap();
    assert_eq!(c.listen.len(), 1);
    assert_eq!(c.listen[0].scheme, Scheme::Rtmps);
    let up = c.upstream.unwrap();
    assert_eq!(up.url.host, "10.0.0.2");
    assert_eq!(up.proxy_protocol, Some(ProxyVersion::V2));
    assert_eq!(c.drain, Duration::from_secs(3));
    assert!(!c.rtmpe);
    assert_eq!(c.log_level.as_deref(), Some("debug"));
    assert_eq!(c.limits.max_connections, 5);
    assert_eq!(
        c.limits.max_connections_per_ip,
        Limits::default().max_connections_per_ip
    );
}

#[test]
fn file_only_and_relative_paths() {
    let toml_text = r#"
        listen = ["rtmps://0.0.0.0:443", "rtmp://0.0.0.0:1935"]
        [tls]
        cert = "fullchain.pem"
        key = "/abs/privkey.pem"
        [[tls.certificates]]
        server_names = ["live.example.com", "*.cdn.example.com"]
        cert = "live/fullchain.pem"
        key = "live/privkey.pem"
        [upstream]
        url = "rtmp://127.0.0.1:1936"
        ca = "ca.pem"
    "#;
    let c = merge(&[], toml_text).unwrap();
    let tls = c.tls.unwrap();
    assert_eq!(
        tls.default,
        [CertSource::Files {
            cert: "/etc/rtmpgate/fullchain.pem".into(),
            key: "/abs/privkey.pem".into()
        }]
    );
    assert_eq!(tls.sni.len(), 1);
    assert_eq!(tls.sni[0].server_names.len(), 2);
    assert_eq!(
        c.upstream.unwrap().ca,
        Some(PathBuf::from("/etc/rtmpgate/ca.pem"))
    );
}

#[test]
fn flag_cert_wins() {
    let c = merge(
        &[
            "--listen",
            "rtmps://0.0.0.0:0",
            "--tls-cert",
            "a.pem",
            "--tls-key",
            "b.pem",
        ],
        "[tls]\ncert = \"x.pem\"\nkey = \"y.pem\"\n",
    )
    .unwrap();
    assert_eq!(
        c.tls.unwrap().default,
        [CertSource::Files {
            cert: "a.pem".into(),
            key: "b.pem".into()
        }]
    );
}

#[test]
fn chains_of_several_kinds_pair_in_order() {
    let files = |c: &str, k: &str| CertSource::Files {
        cert: c.into(),
        key: k.into(),
    };
    // Flags: --tls-cert and --tls-key repeated, paired in order.
    let c = merge(
        &[
            "--listen",
            "rtmps://0.0.0.0:0",
            "--tls-cert",
            "rsa.pem",
            "--tls-key",
            "rsa.key",
            "--tls-cert",
            "ec.pem",
            "--tls-key",
            "ec.key",
        ],
        "",
    )
    .unwrap();
    assert_eq!(
        c.tls.unwrap().default,
        [files("rsa.pem", "rsa.key"), files("ec.pem", "ec.key")]
    );
    // The file: lists in [tls] and in an SNI entry; a single path still works.
    let text = r#"
        listen = ["rtmps://0.0.0.0:0"]
        [tls]
        cert = ["/c/rsa.pem", "/c/ec.pem"]
        key = ["/c/rsa.key", "/c/ec.key"]
        [[tls.certificates]]
        server_names = ["live.example.com"]
        cert = ["/l/rsa.pem", "/l/ec.pem"]
        key = ["/l/rsa.key", "/l/ec.key"]
        [[tls.certificates]]
        server_names = ["old.example.com"]
        cert = "/o/rsa.pem"
        key = "/o/rsa.key"
    "#;
    let tls = merge(&[], text).unwrap().tls.unwrap();
    assert_eq!(
        tls.default,
        [
            files("/c/rsa.pem", "/c/rsa.key"),
            files("/c/ec.pem", "/c/ec.key")
        ]
    );
    assert_eq!(
        tls.sni[0].sources,
        [
            files("/l/rsa.pem", "/l/rsa.key"),
            files("/l/ec.pem", "/l/ec.key")
        ]
    );
    assert_eq!(tls.sni[1].sources, [files("/o/rsa.pem", "/o/rsa.key")]);
    // No default: the first entry's chains serve unknown names, all of them.
    let text = r#"
        listen = ["rtmps://0.0.0.0:0"]
        [[tls.certificates]]
        server_names = ["live.example.com"]
        cert = ["/l/rsa.pem", "/l/ec.pem"]
        key = ["/l/rsa.key", "/l/ec.key"]
    "#;
    let tls = merge(&[], text).unwrap().tls.unwrap();
    assert_eq!(tls.default, tls.sni[0].sources);
}

#[test]
fn unpaired_chain_lists_name_both_keys() {
    let e = merge(
        &[],
        "listen = [\"rtmps://0.0.0.0:0\"]\n[tls]\ncert = [\"a.pem\", \"b.pem\"]\nkey = \"a.key\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("tls.key: "), "{e}");
    assert!(
        e.contains("2 certificate chain(s)") && e.contains("1 key(s)"),
        "{e}"
    );
    let e = merge(
        &[],
        "[[tls.certificates]]\nserver_names = [\"x\"]\ncert = []\nkey = []\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("tls.certificates[0].cert: "), "{e}");
    let e = merge(
        &[
            "--tls-cert",
            "a.pem",
            "--tls-cert",
            "b.pem",
            "--tls-key",
            "a.key",
        ],
        "",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("--tls-key: "), "{e}");
    let e = merge(&[], "[tls]\ncert = 5\nkey = \"a\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("a file path or a list of file paths"), "{e}");
}

#[test]
fn errors_name_the_key() {
    let e = merge(&[], "listen = []").unwrap_err().to_string();
    assert!(e.starts_with("listen: "), "{e}");
    let e = merge(&[], "[tls]\ncert = \"a.pem\"")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("tls.key: "), "{e}");
    let e = merge(&[], "listen = [\"rtmp://0.0.0.0:1935\", \"tcp://x\"]")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("listen[1]: "), "{e}");
    let e = merge(&[], "lisen = []").unwrap_err().to_string();
    assert!(e.contains("lisen"), "{e}");
    let e = merge(&[], "[limits]\nmax_conections = 1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_conections"), "{e}");
    let e = merge(&[], "[upstream]\nproxy_protocol = \"v3\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("v3") || e.contains("variant"), "{e}");
    let e = merge(&["--upstream-ca", "ca.pem"], "")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--upstream: "), "{e}");
    let e = merge(
        &[
            "--listen",
            "rtmp://0.0.0.0:1935",
            "--listen",
            "rtmps://0.0.0.0:1935",
        ],
        "",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("twice"), "{e}");
    let e = merge(
        &[],
        "[[tls.certificates]]\nserver_names = []\ncert = \"a\"\nkey = \"b\"",
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("tls.certificates[0].server_names"), "{e}");
}

#[test]
fn engine_table() {
    let c = merge(
        &[],
        "[engine]\nplayer_wait_secs = 5\ngop_cache = false\nchunk_size = 60000\n",
    )
    .unwrap();
    assert_eq!(c.engine.player_wait, Duration::from_secs(5));
    assert!(!c.engine.gop_cache);
    assert_eq!(c.engine.chunk_size, 60000);
    assert_eq!(
        c.engine.queue_messages,
        EngineConfig::default().queue_messages
    );
    let e = merge(&[], "[engine]\nchunk_size = 64\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("engine.chunk_size: "), "{e}");
    let e = merge(&[], "[engine]\ngop = 1\n").unwrap_err().to_string();
    assert!(e.contains("gop"), "{e}");
    let c = merge(&[], "[engine]\npublisher_takeover = \"replace\"\n").unwrap();
    assert_eq!(
        c.engine.publisher_takeover,
        crate::engine::hub::PublisherTakeover::Replace
    );
    assert_eq!(
        merge(&[], "").unwrap().engine.publisher_takeover,
        crate::engine::hub::PublisherTakeover::Deny
    );
    assert!(merge(&[], "[engine]\npublisher_takeover = \"steal\"\n").is_err());
    let c = merge(&[], "[engine]\nwrite_batch_ms = 0\n").unwrap();
    assert_eq!(c.engine.write_batch, Duration::ZERO);
    let e = merge(&[], "[engine]\nwrite_batch_ms = 5000\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("engine.write_batch_ms: "), "{e}");
}

#[test]
fn upstream_write_batch_default_and_bound() {
    let up = |text: &str| merge(&["--upstream", "rtmp://127.0.0.1:1936"], text);
    let c = up("").unwrap();
    assert_eq!(
        c.upstream.unwrap().write_batch,
        crate::upstream::DEFAULT_WRITE_BATCH
    );
    let c = up("[upstream]\nwrite_batch_ms = 0\n").unwrap();
    assert_eq!(c.upstream.unwrap().write_batch, Duration::ZERO);
    let e = up("[upstream]\nwrite_batch_ms = 5000\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("upstream.write_batch_ms: "), "{e}");
}

#[test]
fn tls_only_when_needed() {
    let c = merge(&["--listen", "rtmp://127.0.0.1:0"], "").unwrap();
    assert!(c.tls.is_none());
}

#[test]
fn huge_durations_are_refused_naming_the_key() {
    for (toml_text, key) in [
        (
            "[limits]\nidle_timeout_secs = 9223372036854775807\n",
            "limits.idle_timeout_secs",
        ),
        (
            "[limits]\ntunnel_order_wait_ms = 9223372036854775807\n",
            "limits.tunnel_order_wait_ms",
        ),
        ("drain_secs = 100000000000\n", "drain_secs"),
        (
            "[engine]\nplayer_wait_secs = 18446744073\n",
            "engine.player_wait_secs",
        ),
        (
            "[upstream]\nconnect_timeout_secs = 40000000\n",
            "upstream.connect_timeout_secs",
        ),
    ] {
        let e = merge(&[], toml_text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{key}: ")), "{e}");
        assert!(e.contains("at most 31536000"), "{e}");
    }
    let e = merge(&["--drain-secs", "99999999999"], "").unwrap_err();
    assert!(e.to_string().starts_with("--drain-secs: "), "{e}");
    // One year is still accepted.
    assert!(merge(&[], "[limits]\nidle_timeout_secs = 31536000\n").is_ok());
    let e = merge(&[], "[limits]\nipv6_prefix_len = 129\n").unwrap_err();
    assert!(e.to_string().starts_with("limits.ipv6_prefix_len: "), "{e}");
}

#[test]
fn trusted_proxies_are_cidr_ranges() {
    let c = merge(
        &["--accept-proxy-protocol"],
        "trusted_proxies = [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\"]\n",
    )
    .unwrap();
    let t = &c.trusted_proxies;
    let has = |ip: &str| t.iter().any(|c| c.contains(ip.parse().unwrap()));
    assert!(has("10.200.3.4") && has("::ffff:10.0.0.1") && has("192.0.2.7"));
    assert!(has("2001:db8:ffff::1"));
    assert!(!has("11.0.0.1") && !has("192.0.2.8") && !has("2001:db9::1"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // Flags replace the file's list.
    let c = merge(
        &["--accept-proxy-protocol", "--trusted-proxy", "127.0.0.1"],
        "trusted_proxies = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    assert_eq!(c.trusted_proxies.len(), 1);
    assert_eq!(c.trusted_proxies[0].to_string(), "127.0.0.1/32");
    // No list: trusted from anywhere, with a warning.
    let c = merge(&["--accept-proxy-protocol"], "").unwrap();
    assert!(c.warnings.iter().any(|w| w.contains("trusted_proxies")));
    for bad in ["10.0.0.0/33", "banana", "::/129", "10.0.0.0/x"] {
        let e = merge(&[], &format!("trusted_proxies = [\"{bad}\"]\n")).unwrap_err();
        assert!(e.to_string().starts_with("trusted_proxies[0]: "), "{e}");
    }
    let e = merge(&["--trusted-proxy", "10.1.2.3/40"], "").unwrap_err();
    assert!(e.to_string().starts_with("--trusted-proxy: "), "{e}");
}

#[test]
fn clap_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
    assert!(Cli::try_parse_from(["rtmpgate", "--tls-cert", "a.pem"]).is_err());
    assert!(Cli::try_parse_from(["rtmpgate", "--upstream-proxy-protocol", "v3"]).is_err());
}

#[test]
fn engine_push_tables_and_their_errors_never_show_the_key() {
    let c = merge(
        &[],
        "[[engine.push]]\napp = \"live*\"\nurl = \"rtmps://ingest.example.com/app/sk_SECRET\"\nca = \"ca.pem\"\n",
    )
    .unwrap();
    let p = &c.engine.push[0];
    assert_eq!(p.app, "live*");
    assert_eq!(p.dest.redacted(), "rtmps://ingest.example.com:443/app/***");
    assert_eq!(p.ca.as_deref(), Some(Path::new("/etc/rtmpgate/ca.pem")));
    let e = merge(
        &[],
        "[[engine.push]]\napp = \"live\"\nurl = \"rtmpt://h/app/sk_SECRET\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("engine.push[0].url") && !e.contains("SECRET"),
        "{e}"
    );
}

#[test]
fn http_flv_keys() {
    let d = merge(&[], "").unwrap().engine;
    assert_eq!(d.http_flv_cors.as_deref(), Some("*"));
    assert_eq!(d.http_flv_wait, Duration::from_secs(5));
    let c = merge(
        &[],
        "[engine]\nhttp_flv_cors = \"https://page.example\"\nhttp_flv_wait_ms = 0\n",
    )
    .unwrap()
    .engine;
    assert_eq!(c.http_flv_cors.as_deref(), Some("https://page.example"));
    assert_eq!(c.http_flv_wait, Duration::ZERO);
    // "" turns the header off.
    let c = merge(&[], "[engine]\nhttp_flv_cors = \"\"\n")
        .unwrap()
        .engine;
    assert_eq!(c.http_flv_cors, None);
    // A value that would break the header line is refused.
    let e = merge(&[], "[engine]\nhttp_flv_cors = \"a\\r\\nX-Evil: 1\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("engine.http_flv_cors: "), "{e}");
    let e = merge(&[], "[engine]\nhttp_flv_wait_ms = 700000\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("engine.http_flv_wait_ms: "), "{e}");
}

#[test]
fn record_keys() {
    use crate::engine::record::RecordApps;
    assert!(merge(&[], "").unwrap().engine.record.is_none());
    assert!(merge(&[], "[engine]\nrecord = \"off\"\n")
        .unwrap()
        .engine
        .record
        .is_none());
    assert!(merge(&[], "[engine]\nrecord = []\nrecord_dir = \"r\"\n")
        .unwrap()
        .engine
        .record
        .is_none());
    let c = merge(
        &[],
        "[engine]\nrecord = \"all\"\nrecord_dir = \"rec\"\nrecord_max_secs = 3600\n",
    )
    .unwrap()
    .engine
    .record
    .unwrap();
    assert_eq!(c.apps, RecordApps::All);
    // Relative to the config file.
    assert_eq!(c.dir, PathBuf::from("/etc/rtmpgate/rec"));
    assert_eq!((c.max_secs, c.max_bytes), (3600, 0));
    let c = merge(
        &[],
        "[engine]\nrecord = [\"live\", \"ev*\"]\nrecord_dir = \"/abs\"\n",
    )
    .unwrap()
    .engine
    .record
    .unwrap();
    assert_eq!(c.apps, RecordApps::Apps(vec!["live".into(), "ev*".into()]));
    assert_eq!(c.dir, PathBuf::from("/abs"));
    for (text, key) in [
        (
            "[engine]\nrecord = \"yes\"\nrecord_dir = \"r\"\n",
            "engine.record: ",
        ),
        (
            "[engine]\nrecord = [\"\"]\nrecord_dir = \"r\"\n",
            "engine.record: ",
        ),
        ("[engine]\nrecord = \"all\"\n", "engine.record_dir: "),
    ] {
        let e = merge(&[], text).unwrap_err().to_string();
        assert!(e.starts_with(key), "{text}: {e}");
    }
}

#[test]
fn vod_dir_must_be_a_directory_and_is_kept_canonical() {
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!("[engine]\nvod_dir = \"{}/./\"\n", tmp.path().display());
    let c = merge(&[], &toml).unwrap();
    let want = std::fs::canonicalize(tmp.path()).unwrap();
    assert_eq!(c.engine.vod_dir.as_deref(), Some(want.as_path()));
    let missing = format!("[engine]\nvod_dir = \"{}/nope\"\n", tmp.path().display());
    let e = merge(&[], &missing).unwrap_err().to_string();
    assert!(
        e.contains("engine.vod_dir") && e.contains("not a readable directory"),
        "{e}"
    );
}

#[test]
fn the_example_configs_parse() {
    // The examples are what operators copy: they must stay valid as the file's keys change.
    for (name, text) in [
        (
            "production.toml",
            include_str!("../../examples/production.toml"),
        ),
        ("local.toml", include_str!("../../examples/local.toml")),
        (
            "behind-load-balancer.toml",
            include_str!("../../examples/behind-load-balancer.toml"),
        ),
    ] {
        if let Err(e) = merge(&[], text) {
            panic!("examples/{name}: {e}");
        }
    }
    let tls = merge(&[], include_str!("../../examples/production.toml"))
        .unwrap()
        .tls
        .unwrap();
    assert_eq!(tls.default.len(), 2, "production.toml serves RSA and ECDSA");
}
