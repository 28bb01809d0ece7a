//! Micro-benchmarks of the hot paths: chunking and reassembling video messages, decoding a
//! real `connect` command, and handing one media message to 1,000 player queues.
//!
//! `cargo bench --bench codec` (never part of `cargo test`).

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rtmpgate::engine::hub::{Event, Hub, HubConfig, StreamKey, SHARED_STREAM_ID};
use rtmpgate::limits::Limits;
use rtmpgate::rtmp::amf0::{Amf0Value, AmfLimits};
use rtmpgate::rtmp::chunk::{encode_fmt0, ChunkDecoder, ChunkEncoder};
use rtmpgate::rtmp::message::{self, Message};

/// A 4 KB video message like those a 1 Mb/s stream carries.
fn video(ts: u32) -> Message {
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    Message::new(message::VIDEO, ts, 1, payload)
}

fn chunk_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk_encode_4k_video");
    g.throughput(Throughput::Bytes(4096));
    for size in [4096u32, 128] {
        g.bench_function(format!("chunk_size_{size}"), |b| {
            let mut enc = ChunkEncoder::new();
            enc.set_chunk_size(size);
            let msg = video(0);
            let mut out = BytesMut::with_capacity(64 * 1024);
            let mut ts = 0u32;
            b.iter(|| {
                ts = ts.wrapping_add(33);
                let m = Message {
                    timestamp: ts,
                    ..msg.clone()
                };
                enc.write(6, &m, &mut out);
                black_box(out.len());
                out.clear();
            });
        });
    }
    g.finish();
}

fn chunk_decode(c: &mut Criterion) {
    const N: usize = 64;
    let mut g = c.benchmark_group("chunk_decode_4k_video");
    g.throughput(Throughput::Bytes(4096 * N as u64));
    for size in [4096u32, 128] {
        let mut enc = ChunkEncoder::new();
        let mut wire = BytesMut::new();
        enc.write(2, &message::set_chunk_size(size), &mut wire);
        for i in 0..N {
            enc.write(6, &video(i as u32 * 33), &mut wire);
        }
        let wire = wire.freeze();
        let limits = Limits::default();
        g.bench_function(format!("chunk_size_{size}_x{N}"), |b| {
            b.iter_batched(
                || (ChunkDecoder::new(&limits), BytesMut::from(&wire[..])),
                |(mut dec, mut buf)| {
                    let mut n = 0;
                    while let Ok(Some(m)) = dec.decode(&mut buf) {
                        n += m.payload.len();
                    }
                    black_box(n)
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

/// The `connect` command ffmpeg 5.1 sends when playing.
fn connect_command() -> Message {
    let obj = Amf0Value::object([
        ("app", Amf0Value::string("live")),
        ("flashVer", Amf0Value::string("LNX 9,0,124,2")),
        ("tcUrl", Amf0Value::string("rtmp://127.0.0.1:1935/live")),
        ("fpad", Amf0Value::Boolean(false)),
        ("capabilities", Amf0Value::Number(15.0)),
        ("audioCodecs", Amf0Value::Number(4071.0)),
        ("videoCodecs", Amf0Value::Number(252.0)),
        ("videoFunction", Amf0Value::Number(1.0)),
    ]);
    message::command_message(0, "connect", 1.0, &[obj])
}

fn amf0_decode(c: &mut Criterion) {
    let msg = connect_command();
    let limits = AmfLimits::default();
    let mut g = c.benchmark_group("amf0");
    g.throughput(Throughput::Bytes(msg.payload.len() as u64));
    g.bench_function("decode_connect_command", |b| {
        b.iter(|| black_box(message::decode_command(black_box(&msg), &limits)))
    });
    g.finish();
}

/// The engine's own fan-out: the publisher pushes one 4 KB video message into the hub
/// (classified and chunked once), and each of 1,000 subscribed players takes it off its
/// ring and gets the bytes to write (`chunks_for`, a shared `Bytes` clone).
fn hub_fanout(c: &mut Criterion) {
    const PLAYERS: usize = 1000;
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(PLAYERS as u64));
    let hub = Hub::new(HubConfig::default());
    let key = StreamKey::new("live", "bench");
    let Ok(publisher) = hub.publish(&key) else {
        return;
    };
    let mut players: Vec<_> = (0..PLAYERS).map(|_| hub.play(&key)).collect();
    let payload = video(0).payload;
    let chunk_size = hub.config().chunk_size;
    let mut ts = 0u32;
    g.bench_function("hub_push_to_1000_players", |b| {
        b.iter(|| {
            ts = ts.wrapping_add(33);
            let _ = publisher.push(message::VIDEO, ts, payload.clone());
            for p in players.iter_mut() {
                if let Ok(Event::Frame(f)) = p.rx.try_recv() {
                    black_box(f.chunks_for(SHARED_STREAM_ID, chunk_size, chunk_size));
                }
            }
        })
    });
    g.finish();
}

/// The same with no hub: chunk the message once with `encode_fmt0`, then one `Bytes`
/// clone per player through a bounded tokio mpsc channel (pushed and popped), as a floor.
fn fanout(c: &mut Criterion) {
    const PLAYERS: usize = 1000;
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(PLAYERS as u64));
    let mut queues: Vec<_> = (0..PLAYERS)
        .map(|_| tokio::sync::mpsc::channel::<Bytes>(64))
        .collect();
    let msg = video(0);
    g.bench_function("encode_once_to_1000_queues", |b| {
        let mut out = BytesMut::with_capacity(8 * 1024);
        b.iter(|| {
            encode_fmt0(6, &msg, 4096, &mut out);
            let wire = out.split().freeze();
            for (tx, _) in &queues {
                let _ = tx.try_send(wire.clone());
            }
            for (_, rx) in queues.iter_mut() {
                black_box(rx.try_recv().ok());
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    chunk_encode,
    chunk_decode,
    amf0_decode,
    hub_fanout,
    fanout
);
criterion_main!(benches);
