#!/usr/bin/env python3
"""Builds the fuzz seed corpora from real sessions: ffmpeg publishes to nginx-rtmp while
rtmpdump and ffmpeg play, all through a recording proxy on loopback. Each direction of
each connection is split into: the chunk stream after the handshake (chunk corpus) and
the AMF bodies of its command/data messages (amf0, amf3, command corpora).

Usage: python3 fuzz/capture.py   (needs ffmpeg, rtmpdump, nginx with the rtmp module)
Everything runs on 127.0.0.1 with ports from binding port 0, every process is killed
and every wait is bounded.
"""
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
HANDSHAKE = 1 + 1536 + 1536  # C0+C1+C2 or S0+S1+S2


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def proxy(listen_port, target_port, captures, stop):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", listen_port))
    ls.listen(8)
    ls.settimeout(0.2)

    def pump(src, dst, buf):
        try:
            while True:
                d = src.recv(65536)
                if not d:
                    break
                buf.extend(d)
                dst.sendall(d)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    while not stop.is_set():
        try:
            c, _ = ls.accept()
        except socket.timeout:
            continue
        u = socket.create_connection(("127.0.0.1", target_port), timeout=5)
        c.settimeout(None)
        u.settimeout(None)
        c2s, s2c = bytearray(), bytearray()
        captures.append((c2s, s2c))
        threading.Thread(target=pump, args=(c, u, c2s), daemon=True).start()
        threading.Thread(target=pump, args=(u, c, s2c), daemon=True).start()
    ls.close()


def messages(stream):
    """Minimal chunk parser for our own captures: yields (type, payload)."""
    chunk_size = 128
    st = {}
    i = 0
    n = len(stream)
    try:
        while i < n:
            b0 = stream[i]
            fmt, csid = b0 >> 6, b0 & 0x3F
            i += 1
            if csid == 0:
                csid = 64 + stream[i]
                i += 1
            elif csid == 1:
                csid = 64 + stream[i] + 256 * stream[i + 1]
                i += 2
            s = st.setdefault(csid, {"len": 0, "type": 0, "ext": False, "body": b"", "tsf": 0})
            if fmt <= 2:
                tsf = int.from_bytes(stream[i:i + 3], "big")
                s["ext"] = tsf == 0xFFFFFF
            if fmt <= 1:
                s["len"] = int.from_bytes(stream[i + 3:i + 6], "big")
                s["type"] = stream[i + 6]
            i += [11, 7, 3, 0][fmt]
            if s["ext"]:
                i += 4
            take = min(chunk_size, s["len"] - len(s["body"]))
            s["body"] += bytes(stream[i:i + take])
            i += take
            if len(s["body"]) >= s["len"]:
                if i > n:
                    return
                yield s["type"], s["body"]
                if s["type"] == 1:
                    chunk_size = int.from_bytes(s["body"][:4], "big") & 0x7FFFFFFF
                s["body"] = b""
    except IndexError:
        return


def save(kind, data):
    d = os.path.join(CORPUS, kind)
    os.makedirs(d, exist_ok=True)
    if not data:
        return
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def tls_client_hello():
    import ssl
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


STATIC_SEEDS = [
    ("sniff", b"POST /open/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n\r\n\x00"),
    ("sniff", b"POST /fcs/ident2 HTTP/1.1\r\n\r\n"),
    ("sniff", b"GET / HTTP/1.0\r\n\r\n"),
    ("sniff", b"PROXY TCP4 127.0.0.1 127.0.0.2 5000 1935\r\n\x03"),
    ("sniff", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00\x00\x01\x7f\x00\x00\x01\x13\x88\x07\x8f\x03"),
    ("sniff", bytes([6]) + bytes(63)),
    ("rtmpt_path", b"/open/1"),
    ("rtmpt_path", b"/fcs/ident2"),
    ("rtmpt_path", b"/send/Ab3_-x9/1"),
    ("rtmpt_path", b"/idle/Ab3_-x9/12"),
    ("rtmpt_path", b"/close/Ab3_-x9/4294967296"),
]


def main():
    nginx_port, proxy_port = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="rtmpgate-capture-")
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;
daemon off; master_process off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;
events {{ worker_connections 64; }}
rtmp {{ server {{ listen 127.0.0.1:{nginx_port}; chunk_size 4000;
  application live {{ live on; }} }} }}
""")
    procs = []
    stop = threading.Event()
    captures = []
    try:
        procs.append(subprocess.Popen(["nginx", "-c", conf, "-p", tmp],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        threading.Thread(target=proxy, args=(proxy_port, nginx_port, captures, stop),
                         daemon=True).start()
        time.sleep(0.2)
        url = f"rtmp://127.0.0.1:{proxy_port}/live/test"
        procs.append(subprocess.Popen(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re",
             "-f", "lavfi", "-i", "testsrc=size=160x120:rate=15",
             "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
             "-t", "4", "-c:v", "libx264", "-g", "15", "-c:a", "aac", "-f", "flv", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        subprocess.run(["timeout", "6", "rtmpdump", "-q", "-r", url, "--live",
                        "--stop", "1", "-o", os.devnull],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        subprocess.run(["timeout", "6", "ffmpeg", "-hide_banner", "-loglevel", "error",
                        "-i", url, "-t", "1", "-f", "null", "-"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        procs[1].wait(timeout=10)
        time.sleep(0.3)
    finally:
        stop.set()
        for p in procs:
            p.kill()
            p.wait(timeout=5)
    counts = {}
    # Stable names for the unit tests in src/rtmp/chunk.rs: the publisher (ffmpeg,
    # first connection) and the first player (rtmpdump) as nginx-rtmp chunks to it.
    os.makedirs(os.path.join(CORPUS, "chunk"), exist_ok=True)
    if len(captures) >= 2:
        for name, data in (("ffmpeg-publish-c2s", captures[0][0]),
                           ("nginx-to-rtmpdump-s2c", captures[1][1])):
            with open(os.path.join(CORPUS, "chunk", name), "wb") as f:
                f.write(bytes(data[HANDSHAKE:HANDSHAKE + 8192]))
    for c2s, s2c in captures:
        # Handshake target: first byte selects the path (0: plain server side,
        # 4: plain digest client side), the rest is what the peer sent.
        save("handshake", bytes([0]) + bytes(c2s[:1537]))
        save("handshake", bytes([4]) + bytes(s2c[:3073]))
        save("sniff", bytes(c2s[:64]))
        # RTMPE target: a real C1 presented with C0 = 6.
        save("rtmpe", bytes([0, 6]) + bytes(c2s[1:1537]))
        for stream in (bytes(c2s), bytes(s2c)):
            body = stream[HANDSHAKE:]
            if not body:
                continue
            # The start of a session (commands, metadata, sequence headers) and a slice
            # of media, kept small: libFuzzer works on short inputs.
            for piece in (body[:4096], body[:16384]):
                save("chunk", piece)
            for t, payload in messages(body):
                if t in (18, 20):
                    save("amf0", payload)
                    if t == 20:
                        save("command", payload)
                        counts["command"] = counts.get("command", 0) + 1
                elif t in (15, 17) and payload:
                    save("amf3", payload[1:])
    for seed in STATIC_SEEDS:
        save(*seed)
    save("sniff", tls_client_hello())
    print(f"{len(captures)} connections captured; corpora in {CORPUS}; {counts}")
    return 0 if captures else 1


if __name__ == "__main__":
    sys.exit(main())
