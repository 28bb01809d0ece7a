//! Command-line entry point: parse flags and config, set up logging, run until a signal.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use rtmpgate::admin;
use rtmpgate::config::{Cli, Config, LogFormat};
use rtmpgate::door::{Door, DoorOptions};
use rtmpgate::engine::Engine;
use rtmpgate::live::{self, Live};
use rtmpgate::net::tls::{self, CertSource, Reloadable};
use rtmpgate::reload::{build_resolver, report, Parts, Reloader};
use rtmpgate::sessions::{self, Sessions};
use rtmpgate::stream::StreamHandler;
use rtmpgate::upstream::Upstream;

fn main() -> ExitCode {
    // `rtmpgate token ...` mints a signed stream token (see README, Authorization).
    if std::env::args().nth(1).as_deref() == Some("token") {
        return ExitCode::from(rtmpgate::auth::token::cli::main(std::env::args().skip(1)));
    }
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rtmpgate: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    // Held to the end: dropping it writes out the lines still queued.
    let _log_guard = match init_logging(&cli, &config) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("rtmpgate: {}", report(&e));
            return ExitCode::from(2);
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if cli.check_config {
        return match check(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rtmpgate: configuration error: {}", report(&e));
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rtmpgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli, config));
    // Sessions still open after the drain are dropped here (their close lines are logged);
    // blocking work gets a moment, not a wait.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtmpgate: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Log lines queued for the writer thread; past it lines are dropped (and counted), never
/// waited for. About 3 MiB at a few hundred bytes a line.
const LOG_QUEUE_LINES: usize = 16_384;
/// How often dropped log lines are reported.
const LOG_DROP_REPORT: std::time::Duration = std::time::Duration::from_secs(10);

/// `--log-level` wins, then RUST_LOG, then the file's `log_level`, then "info".
///
/// Lines go to stderr through a writer thread with a bounded queue, so a slow log sink
/// (a full pipe, a stalled journald) never blocks the runtime's threads: when the queue
/// is full, lines are dropped and counted, and the count is logged every
/// [`LOG_DROP_REPORT`].
fn init_logging(
    cli: &Cli,
    config: &Config,
) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    let filter = match (&cli.log_level, std::env::var("RUST_LOG")) {
        (Some(level), _) => EnvFilter::try_new(level).with_context(|| {
            format!(
                "--log-level: '{level}' is not a log level; use error, warn, info, debug or trace"
            )
        })?,
        (None, Ok(env)) if !env.trim().is_empty() => EnvFilter::try_new(&env)
            .with_context(|| format!("RUST_LOG: '{env}' is not a valid filter"))?,
        _ => {
            let level = config.log_level.as_deref().unwrap_or("info");
            EnvFilter::try_new(level).with_context(|| {
                format!("log_level: '{level}' is not a log level; use error, warn, info, debug or trace")
            })?
        }
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("rtmpgate-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match config.log_format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
    std::thread::Builder::new()
        .name("rtmpgate-log-drops".into())
        .spawn(move || {
            let mut reported = 0;
            loop {
                std::thread::sleep(LOG_DROP_REPORT);
                let now = dropped.dropped_lines();
                if now > reported {
                    tracing::warn!(
                        "log: {} lines dropped in the last {} s ({now} since start): stderr \
                         took lines more slowly than they came; lines are dropped rather than \
                         stalling clients",
                        now - reported,
                        LOG_DROP_REPORT.as_secs()
                    );
                    reported = now;
                }
            }
        })
        .context("starting the log-drop reporter thread")?;
    Ok(guard)
}

/// Loads the certificates, the key(s) and the upstream CA, as a start would, then reports.
fn check(config: &Config) -> anyhow::Result<()> {
    if let Some(tls) = &config.tls {
        build_resolver(tls)?;
    }
    if let Some(up) = &config.upstream {
        Upstream::new(up, &config.limits)?;
    }
    println!("configuration is valid");
    for l in &config.listen {
        println!("  listen   {l}");
    }
    if let Some(tls) = &config.tls {
        println!("  tls      {}", tls.default_named());
        for s in &tls.sni {
            println!(
                "  tls sni  {} -> {}",
                s.server_names.join(", "),
                s.sources_named()
            );
        }
    }
    if let Some(up) = &config.upstream {
        let pp = match up.proxy_protocol {
            Some(v) => format!(", PROXY protocol {v:?}"),
            None => String::new(),
        };
        println!("  upstream {}{pp}", up.url);
    } else {
        println!("  engine   built-in (no upstream)");
    }
    println!(
        "  rtmpe {}, accept PROXY protocol {}, drain {} s",
        if config.rtmpe { "on" } else { "off" },
        match (
            config.accept_proxy_protocol,
            config.trusted_proxies.as_slice()
        ) {
            (false, _) => "no".to_string(),
            (true, []) => "yes, from any address".to_string(),
            (true, list) => format!(
                "yes, from {}",
                list.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        config.drain.as_secs()
    );
    match (&config.admin.listen, &config.admin.tls) {
        (None, _) => println!("  admin    off"),
        (Some(addr), tls) => println!(
            "  admin    {}://{addr}{}",
            if tls.is_some() { "https" } else { "http" },
            if config.admin.token.is_some() {
                ", bearer token required"
            } else {
                ""
            }
        ),
    }
    if let Some(path) = &config.access_log {
        println!("  access log {}", path.display());
    }
    if let Some(c) = &config.cluster {
        println!(
            "  cluster  node {}, link {}, {} peer(s){}",
            c.node_id,
            c.listen.map_or("off".to_string(), |a| a.to_string()),
            c.peers.len(),
            c.peers_dns
                .as_ref()
                .map_or(String::new(), |(n, p)| format!(" + DNS {n}:{p}"))
        );
    }
    Ok(())
}

/// Raises the soft file-descriptor limit to the hard one and says, with the numbers, when
/// the connection limits may need more than that.
fn check_fd_limit(config: &Config) {
    use rtmpgate::door::fdlimit;
    let nofile = match fdlimit::raise() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("could not raise the open-file limit (RLIMIT_NOFILE): {e}");
            return;
        }
    };
    tracing::info!(
        "open-file limit: soft {} (was {}), hard {}",
        nofile.soft,
        nofile.soft_before,
        nofile.hard
    );
    let upstream = config.upstream.is_some();
    let needed = fdlimit::needed(&config.limits, upstream);
    if needed > nofile.soft {
        tracing::warn!(
            "limits.max_connections = {} may need {needed} file descriptors ({} per connection{} \
             + {} for the process and its streams' logs) but the open-file limit is {}: past it new connections \
             fail to be accepted. Raise the hard limit (ulimit -Hn, LimitNOFILE= in a systemd \
             unit) or lower limits.max_connections to {}",
            config.limits.max_connections,
            fdlimit::fds_per_connection(upstream),
            if upstream {
                " with the upstream leg"
            } else {
                ""
            },
            fdlimit::RESERVED_FDS + fdlimit::STREAM_LOG_FDS,
            nofile.soft,
            nofile
                .soft
                .saturating_sub(fdlimit::RESERVED_FDS + fdlimit::STREAM_LOG_FDS)
                / fdlimit::fds_per_connection(upstream)
        );
    }
}

/// SIGHUP runs the reload (off the executor threads: it reads files).
#[cfg(unix)]
fn reload_on_sighup(reloader: Arc<Reloader>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let r = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload("SIGHUP")).await;
        }
    });
    Ok(())
}

async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    check_fd_limit(&config);
    rtmpgate::engine::record::ignore_file_size_signal();
    let limits = Arc::new(config.limits.clone());
    let budget = config.limits.memory_budget();
    rtmpgate::budget::global().set_limit(budget);
    let per_ip = config.limits.memory_budget_per_ip(budget);
    rtmpgate::budget::set_per_address_limit(per_ip, config.limits.ipv6_prefix_len);
    tracing::info!(
        "memory budget for peers' data: {} MiB (limits.max_memory), {} MiB per address \
         (limits.max_memory_per_ip)",
        budget >> 20,
        per_ip >> 20
    );
    let tls = match &config.tls {
        Some(settings) => {
            for source in &settings.default {
                match source {
                    CertSource::EmbeddedDev => tracing::warn!(
                        "TLS listeners use the built-in dev certificate for localhost; its key is \
                     public, so use it for testing only (set --tls-cert and --tls-key)"
                    ),
                    CertSource::Files { cert, .. } if cert.ends_with("certs/localhost.pem") => {
                        tracing::warn!(
                        "TLS listeners use the dev certificate {}; its key is public, so use it \
                         for testing only (set --tls-cert and --tls-key)",
                        cert.display()
                    )
                    }
                    CertSource::Files { .. } => {}
                }
            }
            let resolver = Reloadable::new(build_resolver(settings)?);
            Some((tls::server_config_with(resolver.clone())?, resolver))
        }
        None => None,
    };
    let (tls, resolver) = match tls {
        Some((config, resolver)) => (Some(config), Some(resolver)),
        None => (None, None),
    };
    let (inner, engine): (StreamHandler, _) = match &config.upstream {
        Some(settings) => {
            let upstream = Arc::new(Upstream::new(settings, &config.limits)?);
            tracing::info!(
                "forwarding every client to {} ({})",
                upstream.url(),
                upstream.describe()
            );
            (upstream.handler(), None)
        }
        None => {
            tracing::info!("serving clients with the built-in RTMP engine (no --upstream)");
            let engine = Engine::try_new(config.limits.clone(), config.engine.clone())?;
            if let Some(edge) = engine.edge() {
                tracing::info!("{}", edge.describe());
            }
            (engine.handler(), Some(engine))
        }
    };
    // A reload swaps what new sessions are handed to (engine settings, upstream).
    let current = Arc::new(Live::new(inner));
    let sessions = Sessions::new();
    let handler = sessions::accounted(live::switchable(current.clone()), sessions.clone());
    if let Some(path) = &config.access_log {
        rtmpgate::access::open(path)?;
        tracing::info!("access log: {}", path.display());
    }
    let admin = admin::State::new(
        sessions.clone(),
        engine.clone(),
        config.upstream.clone(),
        config.admin.token.clone(),
    );
    admin::start(&config.admin, admin.clone())?;
    let door = Door::bind(
        &config.listen,
        DoorOptions {
            limits,
            tls,
            rtmpe: config.rtmpe,
            accept_proxy_protocol: config.accept_proxy_protocol,
            trusted_proxies: config.trusted_proxies.clone(),
        },
        handler,
    )
    .await?;
    let tunnel = door.tunnel();
    admin.set_bound(tunnel.clone());
    if let Some(cluster) = &config.cluster {
        let limits = Arc::new(config.limits.clone());
        rtmpgate::cluster::Cluster::start(cluster.clone(), limits, &tunnel).await?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listening = door.start_live(stop_rx);
    let reloader = Reloader::new(
        cli,
        config.clone(),
        tokio::runtime::Handle::current(),
        Parts {
            handler: current,
            engine,
            resolver,
            listening: listening.clone(),
            admin: admin.clone(),
        },
    );
    let r = reloader.clone();
    admin.set_reloader(Box::new(move |via: &str| r.reload(via)));
    #[cfg(unix)]
    reload_on_sighup(reloader.clone())?;

    let signal = wait_for_signal().await?;
    let drain = reloader.drain();
    admin.set_draining();
    tracing::info!(
        "{signal}: no longer accepting; letting {} open session(s) finish for up to {} s",
        sessions.active(),
        drain.as_secs()
    );
    let _ = stop_tx.send(true);
    listening.stopped().await;
    let left = tokio::select! {
        left = sessions.wait_idle(drain) => left,
        second = wait_for_signal() => {
            tracing::info!("{}: closing now", second.unwrap_or("second signal"));
            sessions.active()
        }
    };
    if left > 0 {
        tracing::info!("closing {left} session(s) still open after the drain");
    }
    // Tunnel clients get their EOF through the tunnel (a final poll answer), not a reset.
    tunnel.shutdown();
    if left > 0 {
        sessions.wait_idle(std::time::Duration::from_secs(1)).await;
    }
    // Recordings still open (their publishers outlived the drain) get their final file.
    rtmpgate::engine::record::finish_all(rtmpgate::engine::record::FINISH_WAIT).await;
    tracing::info!("shut down after {} session(s) in total", sessions.opened());
    Ok(())
}

/// Waits for SIGINT or SIGTERM; returns which.
async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("installing the Ctrl-C handler")?;
        Ok("Ctrl-C")
    }
}
