//! RTMPE and the digest handshake against real clients, with nginx-rtmp as the backend.
//!
//! A tiny gateway runs inside the test (a tokio listener, `door::rtmpe::accept`, a byte pump
//! to nginx); rtmpdump 2.4 and the static ffmpeg 9 play over rtmpe:// through it. A second
//! test puts `handshake::server_reply` in front of clients and `ClientHandshake` in front of
//! nginx. Received media is compared frame by frame (video packet hashes from
//! `ffmpeg -f framemd5`) with the source. Peers, nginx, processes and the frame comparison come
//! from tests/common (a missing peer fails the test). `RTMPE_TEST_KEEP=DIR` keeps recordings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtmpgate::door::rtmpe::{accept_with, AnswerPolicy};
use rtmpgate::door::rtmpt::Tunnel;
use rtmpgate::limits::Limits;
use rtmpgate::rtmp::handshake::{
    find_digest, fms_key_short, server_reply, ClientHandshake, HandshakeKind,
};
use rtmpgate::stream::{ClientStream, Prefixed, StreamHandler, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::*;

/// A source file, nginx-rtmp, and the processes to clean up.
struct Bench {
    _tmp: TempDir,
    dir: PathBuf,
    procs: Vec<Proc>,
    src: PathBuf,
    src_video: Vec<Frame>,
    nginx: Nginx,
}

impl Bench {
    fn start(name: &str) -> Bench {
        let tmp = temp_dir();
        let dir = match std::env::var_os("RTMPE_TEST_KEEP") {
            Some(k) => PathBuf::from(k).join(name),
            None => tmp.path().to_path_buf(),
        };
        std::fs::create_dir_all(&dir).unwrap();
        let src = source_flv(8);
        let src_video = video_frames(&src);
        assert!(src_video.len() > 150);
        Bench {
            _tmp: tmp,
            dir,
            procs: Vec::new(),
            src,
            src_video,
            nginx: Nginx::start(),
        }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.flv"))
    }

    fn rtmpdump(&mut self, name: &str, url: &str) -> (String, usize, PathBuf) {
        let out = self.out(name);
        self.procs.push(play_rtmpdump(url, &out));
        (name.to_string(), self.procs.len() - 1, out)
    }

    fn ffplay(&mut self, name: &str, ffmpeg: &Path, url: &str) -> (String, usize, PathBuf) {
        let out = self.out(name);
        self.procs.push(play_ffmpeg_with(ffmpeg, url, &out));
        (name.to_string(), self.procs.len() - 1, out)
    }

    fn publish(&mut self, ffmpeg: &Path, url: &str) -> usize {
        self.procs.push(publish(ffmpeg, url, &self.src));
        self.procs.len() - 1
    }

    /// Wait for the publishers (they must succeed unless listed in `may_fail`), then give
    /// the players a few seconds to drain, then compare what each received.
    async fn finish(
        self,
        publishers: Vec<(usize, bool)>,
        players: Vec<(String, usize, PathBuf)>,
    ) -> Bench {
        let bench = tokio::task::spawn_blocking(move || {
            let mut bench = self;
            let deadline = Instant::now() + Duration::from_secs(40);
            for (i, must_succeed) in publishers {
                let p = &mut bench.procs[i];
                p.wait_or_kill(deadline.saturating_duration_since(Instant::now()));
                let st = p.try_status();
                if must_succeed {
                    assert!(
                        st.is_some_and(|s| s.success()),
                        "a publisher failed: {st:?}"
                    );
                }
            }
            // Live players end when the publisher leaves, or are stopped here the way the
            // common harness stops them (SIGINT, on which both finish their file; a second
            // one for ffmpeg in a blocking read), so their shortfall is the baseline's.
            let drain = Instant::now() + Duration::from_secs(4);
            for (name, i, _) in &players {
                let p = &mut bench.procs[*i];
                let alone = p
                    .wait_timeout(drain.saturating_duration_since(Instant::now()))
                    .is_some();
                if !alone {
                    p.signal("INT");
                    if p.wait_timeout(Duration::from_millis(300)).is_none() {
                        p.signal("INT");
                    }
                    p.wait_or_kill(Duration::from_secs(5));
                }
                println!("{name}: exit {:?} (ended alone: {alone})", p.try_status());
            }
            for (name, _, out) in &players {
                // Started before the publisher: from the first packet, and to within the
                // player's shortfall straight from nginx-rtmp (ffmpeg drops what it still
                // had buffered when it is stopped).
                let max_tail = if name.starts_with("rtmpdump") {
                    PlayerKind::Rtmpdump.max_tail_ms()
                } else {
                    FFMPEG_TAIL_MS
                };
                check_frames(name, &bench.src_video, &video_frames(out), max_tail);
            }
            bench
        })
        .await
        .unwrap();
        bench
    }
}

/// The video packets of an FLV, in order (the checks here are on video).
fn video_frames(flv: &Path) -> Vec<Frame> {
    framemd5(flv)
        .into_iter()
        .filter(|f| f.media == "video")
        .collect()
}

/// How far before the source's end an ffmpeg player stopped by this harness may stop: in
/// every run measured, ffmpeg 5.1 straight from nginx-rtmp (`ffmpeg5_plain` in
/// `digest_handshake_both_sides_with_real_peers`, the same run's baseline) and the static
/// ffmpeg through rtmpgate both end exactly 1100 ms short of this 8 s source; 200 ms margin.
const FFMPEG_TAIL_MS: i64 = 1300;

/// Received video must be one contiguous run of the source's from its first packet, ending at
/// most `max_tail_ms` before its end (the last packet may be cut).
fn check_frames(name: &str, src: &[Frame], got: &[Frame], max_tail_ms: i64) {
    assert_whole_run(name, src, got, max_tail_ms);
}

/// The gateway under test: a first byte of 6/8/9 goes through the RTMPE door, anything else
/// is pumped as is; both end up byte-pumped to the backend.
async fn gateway(
    listener: TcpListener,
    backend: u16,
    policy: AnswerPolicy,
    seen: Arc<AtomicUsize>,
) {
    loop {
        let Ok((mut tcp, peer)) = listener.accept().await else {
            return;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let local = tcp.local_addr().unwrap();
            let mut first = [0u8; 1];
            if tcp.read_exact(&mut first).await.is_err() {
                return;
            }
            let io = Prefixed::new(bytes::Bytes::copy_from_slice(&first), tcp);
            let stream = ClientStream::new(Box::new(io), Transport::Rtmp, peer, local);
            let mut stream = if matches!(first[0], 6 | 8 | 9) {
                match accept_with(stream, &Limits::default(), policy).await {
                    Ok(s) => {
                        assert_eq!(s.transport, Transport::Rtmpe);
                        seen.fetch_add(1, Ordering::SeqCst);
                        s
                    }
                    Err(e) => {
                        eprintln!("gateway: {e}");
                        return;
                    }
                }
            } else {
                stream
            };
            let Ok(mut up) = TcpStream::connect(("127.0.0.1", backend)).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut up).await;
        });
    }
}

/// A minimal plain RTMP server for one publisher that never sends Set Chunk Size: it
/// answers connect, createStream and publish, and writes the media it receives to `flv`.
async fn publish_sink(listener: TcpListener, flv: PathBuf, connected: Arc<AtomicUsize>) {
    use bytes::{BufMut, BytesMut};
    use rtmpgate::rtmp::amf0::{decode_all, encode_all, Amf0Value, AmfLimits};
    use rtmpgate::rtmp::chunk::{ChunkDecoder, ChunkEncoder};
    use rtmpgate::rtmp::message::{Message, AUDIO, COMMAND_AMF0, DATA_AMF0, VIDEO};

    let Ok((mut tcp, _)) = listener.accept().await else {
        return;
    };
    let mut c0c1 = vec![0u8; 1537];
    tcp.read_exact(&mut c0c1).await.unwrap();
    tcp.write_all(&server_reply(&c0c1).unwrap().s0s1s2)
        .await
        .unwrap();
    let mut c2 = vec![0u8; 1536];
    tcp.read_exact(&mut c2).await.unwrap();

    let limits = Limits::default();
    let mut dec = ChunkDecoder::new(&limits);
    let mut enc = ChunkEncoder::new();
    let mut inbuf = BytesMut::new();
    let mut file = BytesMut::new();
    file.put_slice(b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00");
    let obj = |kv: &[(&str, &str)]| {
        Amf0Value::object(kv.iter().map(|(k, v)| (*k, Amf0Value::string(*v))))
    };
    loop {
        let mut buf = [0u8; 16384];
        let n = match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        inbuf.extend_from_slice(&buf[..n]);
        while let Some(msg) = dec.decode(&mut inbuf).unwrap() {
            let mut out = BytesMut::new();
            match msg.msg_type {
                COMMAND_AMF0 => {
                    let v = decode_all(&msg.payload, &AmfLimits::default()).unwrap();
                    let name = v.first().and_then(Amf0Value::as_str).unwrap_or("");
                    let txn = v.get(1).and_then(Amf0Value::as_f64).unwrap_or(0.0);
                    let reply = match name {
                        "connect" => {
                            connected.fetch_add(1, Ordering::SeqCst);
                            Some((
                                0,
                                vec![
                                    Amf0Value::string("_result"),
                                    Amf0Value::Number(txn),
                                    obj(&[("fmsVer", "FMS/3,5,1,1")]),
                                    obj(&[
                                        ("level", "status"),
                                        ("code", "NetConnection.Connect.Success"),
                                    ]),
                                ],
                            ))
                        }
                        "createStream" => Some((
                            0,
                            vec![
                                Amf0Value::string("_result"),
                                Amf0Value::Number(txn),
                                Amf0Value::Null,
                                Amf0Value::Number(1.0),
                            ],
                        )),
                        "publish" => Some((
                            1,
                            vec![
                                Amf0Value::string("onStatus"),
                                Amf0Value::Number(0.0),
                                Amf0Value::Null,
                                obj(&[("level", "status"), ("code", "NetStream.Publish.Start")]),
                            ],
                        )),
                        _ => None,
                    };
                    if let Some((stream, values)) = reply {
                        let m = Message::new(COMMAND_AMF0, 0, stream, encode_all(&values));
                        enc.write(3, &m, &mut out);
                    }
                }
                AUDIO | VIDEO | DATA_AMF0 => {
                    let len = msg.payload.len() as u32;
                    file.put_u8(msg.msg_type);
                    file.put_slice(&len.to_be_bytes()[1..]);
                    file.put_slice(&msg.timestamp.to_be_bytes()[1..]);
                    file.put_u8((msg.timestamp >> 24) as u8);
                    file.put_slice(&[0, 0, 0]);
                    file.put_slice(&msg.payload);
                    file.put_u32(len + 11);
                }
                _ => {}
            }
            if !out.is_empty() {
                tcp.write_all(&out).await.unwrap();
            }
        }
    }
    std::fs::write(&flv, &file).unwrap();
}

/// A plain handshake on both sides: `server_reply` with the client, `ClientHandshake`
/// (digest) with the backend, then a byte pump. Records what kind each client got.
async fn bridge(listener: TcpListener, backend: u16, kinds: Arc<Mutex<Vec<HandshakeKind>>>) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        let kinds = kinds.clone();
        tokio::spawn(async move {
            let mut c0c1 = vec![0u8; 1537];
            tcp.read_exact(&mut c0c1).await.unwrap();
            let reply = server_reply(&c0c1).unwrap();
            tcp.write_all(&reply.s0s1s2).await.unwrap();
            let mut c2 = vec![0u8; 1536];
            tcp.read_exact(&mut c2).await.unwrap();
            kinds.lock().unwrap().push(reply.kind);

            let mut up = TcpStream::connect(("127.0.0.1", backend)).await.unwrap();
            let client = ClientHandshake::new(true);
            up.write_all(&client.c0c1()).await.unwrap();
            let mut s0s1s2 = vec![0u8; 3073];
            up.read_exact(&mut s0s1s2).await.unwrap();
            let s1: &[u8; 1536] = s0s1s2[1..1537].try_into().unwrap();
            assert!(
                find_digest(s1, fms_key_short()).is_some(),
                "nginx should answer our digest C1 with a digest S1"
            );
            // c2() checks nginx's S2 signature against our C1 digest.
            let c2 = client
                .c2(&s0s1s2)
                .expect("nginx's S2 must verify against our digest C1");
            up.write_all(&c2).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmpe_clients_through_door_to_nginx() {
    let mut bench = Bench::start("rtmpe");
    let ff9 = &peers().static_ffmpeg;

    // One gateway listener per S0 policy: recommended (6 for 6), and 8 and 9 forced so the
    // clients check our XTEA and Blowfish signatures.
    let mut gw: Vec<(&str, SocketAddr, Arc<AtomicUsize>)> = Vec::new();
    for (name, policy) in [
        ("t6", AnswerPolicy::Recommended),
        ("t8", AnswerPolicy::Force(8)),
        ("t9", AnswerPolicy::Force(9)),
    ] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        tokio::spawn(gateway(l, bench.nginx.port(), policy, seen.clone()));
        gw.push((name, addr, seen));
    }

    // ffmpeg 9 cannot publish over rtmpe to a server that sends Set Chunk Size (nginx-rtmp
    // does): its rtmpe_write encrypts the caller's buffer in place, and handle_chunk_size
    // echoes the packet before reading the size from it, so it reads ciphertext. Its
    // publish goes through the door to a minimal server that never sends one.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let sink_flv = bench.out("sink_ffmpeg9_rtmpe_publish");
    let sink_connects = Arc::new(AtomicUsize::new(0));
    let sink_task = tokio::spawn(publish_sink(sink, sink_flv.clone(), sink_connects.clone()));
    let sink_gw = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_gw_addr = sink_gw.local_addr().unwrap();
    let sink_seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(gateway(
        sink_gw,
        sink_port,
        AnswerPolicy::Recommended,
        sink_seen.clone(),
    ));

    // Players first: nginx holds them until the publisher starts.
    let mut players = Vec::new();
    for (name, addr, _) in &gw {
        let url = format!("rtmpe://{addr}/live/a");
        players.push(bench.rtmpdump(&format!("rtmpdump_rtmpe_{name}"), &url));
        players.push(bench.ffplay(&format!("ffmpeg9_rtmpe_{name}"), ff9, &url));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let plain = format!("rtmp://127.0.0.1:{}/live/a", bench.nginx.port());
    let sink_url = format!("rtmpe://{sink_gw_addr}/live/b");
    let publishers = vec![
        (bench.publish(&peers().ffmpeg, &plain), true),
        (bench.publish(ff9, &sink_url), true),
    ];
    let bench = bench.finish(publishers, players).await;

    sink_task.await.unwrap();
    assert_eq!(sink_seen.load(Ordering::SeqCst), 1);
    assert_eq!(sink_connects.load(Ordering::SeqCst), 1);
    check_frames(
        "ffmpeg 9 rtmpe publish (to a sink)",
        &bench.src_video,
        &video_frames(&sink_flv),
        PlayerKind::Rtmpdump.max_tail_ms(),
    );
    for (name, _, seen) in &gw {
        let n = seen.load(Ordering::SeqCst);
        println!("gateway {name}: {n} rtmpe handshakes");
        assert_eq!(n, 2, "gateway {name}: rtmpe handshakes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_handshake_both_sides_with_real_peers() {
    let mut bench = Bench::start("digest");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let kinds = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(bridge(l, bench.nginx.port(), kinds.clone()));

    let url = format!("rtmp://{addr}/live/a");
    let players = vec![
        bench.rtmpdump("rtmpdump_plain", &url),
        // ffmpeg checks our S1 digest and S2 signature when playing (S1 version >= 3).
        bench.ffplay("ffmpeg5_plain", &peers().ffmpeg, &url),
        bench.ffplay("ffmpeg9_plain", &peers().static_ffmpeg, &url),
    ];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let publishers = vec![(bench.publish(&peers().ffmpeg, &url), true)];
    let _bench = bench.finish(publishers, players).await;

    let kinds = kinds.lock().unwrap().clone();
    println!("handshake kinds: {kinds:?}");
    let digest = kinds
        .iter()
        .filter(|k| matches!(k, HandshakeKind::Digest(_)))
        .count();
    // ffmpeg (both builds, play and publish) signs C1; rtmpdump without SWF verification
    // does the simple handshake.
    assert_eq!(digest, 3, "{kinds:?}");
    assert!(kinds.contains(&HandshakeKind::Simple), "{kinds:?}");
}

/// The RTMPT tunnel's stream handler as the dispatcher will have it: a first byte of 6/8/9
/// goes through the RTMPE door, then everything is pumped to the backend.
fn tunnel_handler(backend: u16, seen: Arc<Mutex<Vec<Transport>>>) -> StreamHandler {
    Arc::new(move |mut stream: ClientStream| {
        let seen = seen.clone();
        Box::pin(async move {
            let mut first = [0u8; 1];
            if stream.read_exact(&mut first).await.is_err() {
                return;
            }
            let prefix = bytes::Bytes::copy_from_slice(&first);
            let stream = stream.map_io(|io| Box::new(Prefixed::new(prefix, io)));
            let mut stream = if matches!(first[0], 6 | 8 | 9) {
                match rtmpgate::door::rtmpe::accept(stream, &Limits::default()).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("tunnel: {e}");
                        return;
                    }
                }
            } else {
                stream
            };
            seen.lock().unwrap().push(stream.transport);
            let Ok(mut up) = TcpStream::connect(("127.0.0.1", backend)).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut up).await;
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmpte_clients_through_tunnel_and_door_to_nginx() {
    let mut bench = Bench::start("rtmpte");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tunnel = Tunnel::new(
        Arc::new(Limits::default()),
        tunnel_handler(bench.nginx.port(), seen.clone()),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let t = tunnel.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = l.accept().await {
            let local = tcp.local_addr().unwrap();
            let t = t.clone();
            tokio::spawn(async move { t.serve_connection(tcp, peer, local, false).await });
        }
    });

    // ffmpeg 9 publishing over rtmpte goes to a sink (see the rtmpe test for why).
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let sink_flv = bench.out("sink_ffmpeg9_rtmpte_publish");
    let sink_connects = Arc::new(AtomicUsize::new(0));
    let sink_task = tokio::spawn(publish_sink(sink, sink_flv.clone(), sink_connects.clone()));
    let sink_tunnel = Tunnel::new(
        Arc::new(Limits::default()),
        tunnel_handler(sink_port, seen.clone()),
    );
    let sl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sl.local_addr().unwrap();
    let t = sink_tunnel.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = sl.accept().await {
            let local = tcp.local_addr().unwrap();
            let t = t.clone();
            tokio::spawn(async move { t.serve_connection(tcp, peer, local, false).await });
        }
    });

    let url = format!("rtmpte://{addr}/live/a");
    let players = vec![
        bench.rtmpdump("rtmpdump_rtmpte", &url),
        bench.ffplay("ffmpeg9_rtmpte", &peers().static_ffmpeg, &url),
    ];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let plain = format!("rtmp://127.0.0.1:{}/live/a", bench.nginx.port());
    let sink_url = format!("rtmpte://{sink_addr}/live/b");
    let publishers = vec![
        (bench.publish(&peers().ffmpeg, &plain), true),
        (bench.publish(&peers().static_ffmpeg, &sink_url), true),
    ];
    let bench = bench.finish(publishers, players).await;
    tunnel.shutdown();
    sink_task.await.unwrap();
    sink_tunnel.shutdown();
    assert_eq!(sink_connects.load(Ordering::SeqCst), 1);
    check_frames(
        "ffmpeg 9 rtmpte publish (to a sink)",
        &bench.src_video,
        &video_frames(&sink_flv),
        PlayerKind::Rtmpdump.max_tail_ms(),
    );

    let seen = seen.lock().unwrap().clone();
    println!("tunnel sessions: {seen:?}");
    let want = 3;
    assert_eq!(
        seen.iter().filter(|t| **t == Transport::Rtmpte).count(),
        want,
        "{seen:?}"
    );
}
