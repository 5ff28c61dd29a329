#!/usr/bin/env python3
"""Clients that start a stream and never read it: duet's RSS before and at its peak.

usage: stalled_clients.py PORT N DUET_PID SECONDS [h2|h1]

h2 (default): HTTP/2 with prior knowledge, one stream per connection, the default 64 KiB
windows never given back, so at most 64 KiB of each stream leaves duet and the rest of what a
stalled stream costs is in duet's memory, not in kernel socket buffers. h1: HTTP/1.1, where the
kernel's socket buffers (not counted in RSS) take megabytes first. Deltas on. Standard library
only.
"""
import json
import socket
import struct
import sys
import time

port, n, pid, hold = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
proto = sys.argv[5] if len(sys.argv) > 5 else "h2"


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def frame(typ, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([typ, flags]) + struct.pack(">I", stream) + payload


def literal(name, value):
    # HPACK literal header field without indexing, no Huffman (names and values < 127 bytes).
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


body = json.dumps({"query": "stall me", "deltas": True}).encode()
if proto == "h2":
    headers = b"".join(literal(k, v) for k, v in [
        (":method", "POST"), (":scheme", "http"), (":path", "/query/stream"),
        (":authority", "duet"), ("content-type", "application/json")])
    request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
               + frame(1, 4, 1, headers) + frame(0, 1, 1, body))
else:
    request = (b"POST /query/stream HTTP/1.1\r\nHost: duet\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

before = rss_kib()
clients = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    clients.append(s)
samples = []
start = time.time()
while time.time() - start < hold:
    time.sleep(1)
    samples.append(rss_kib())
peak = max(samples)
print(json.dumps({"proto": proto, "clients": n, "rss_before_kib": before, "rss_peak_kib": peak,
                  "per_stream_kib": round((peak - before) / n, 1)}))
for s in clients:
    s.close()
