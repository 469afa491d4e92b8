#!/usr/bin/env python3
"""A raw BGP peer for tests: accepts one connection on :179 with GTSM
(TTL 255), completes the OPEN exchange as AS 65000, then sends the frames
named on the command line (hex strings) and reports what came back.

Usage: raw_rr.py ROUTER_ID [--enhanced-refresh] HEX_FRAME... ; prints one
JSON line per message received after the frames were sent, and "closed" at
EOF. --enhanced-refresh adds the Enhanced Route Refresh capability (70).
--eager sends the frames in the same write as its KEEPALIVE, before the
agent's KEEPALIVE arrives (what a reflector does on a fast reconnect)."""
import json
import socket
import struct
import sys


def msg(kind, body=b""):
    return b"\xff" * 16 + struct.pack("!HB", 19 + len(body), kind) + body


def open_msg(router_id, enhanced_refresh=False):
    caps = bytes([1, 4, 0, 1, 0, 1])  # MP IPv4 unicast
    caps += bytes([1, 4, 0, 2, 0, 1])  # MP IPv6 unicast
    caps += bytes([65, 4]) + struct.pack("!I", 65000)  # 4-octet AS
    if enhanced_refresh:
        caps += bytes([2, 0, 70, 0])  # route refresh, enhanced route refresh
    params = bytes([2, len(caps)]) + caps
    body = struct.pack("!BHH", 4, 65000, 9) + socket.inet_aton(router_id)
    return msg(1, body + bytes([len(params)]) + params)


def read_msg(conn):
    head = b""
    while len(head) < 19:
        chunk = conn.recv(19 - len(head))
        if not chunk:
            return None
        head += chunk
    length, kind = struct.unpack("!HB", head[16:19])
    body = b""
    while len(body) < length - 19:
        chunk = conn.recv(length - 19 - len(body))
        if not chunk:
            return None
        body += chunk
    return kind, body


def main():
    router_id, frames = sys.argv[1], sys.argv[2:]
    enhanced_refresh = "--enhanced-refresh" in frames
    eager = "--eager" in frames
    frames = [f for f in frames if not f.startswith("--")]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
    srv.bind(("0.0.0.0", 179))
    srv.listen(1)
    srv.settimeout(30)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
    conn.settimeout(15)
    conn.sendall(open_msg(router_id, enhanced_refresh))
    got = read_msg(conn)  # their OPEN
    assert got and got[0] == 1, got
    if eager:
        conn.sendall(msg(4) + b"".join(bytes.fromhex(f) for f in frames))
        got = read_msg(conn)  # their KEEPALIVE
        print(json.dumps({"established": True}), flush=True)
    else:
        conn.sendall(msg(4))
        got = read_msg(conn)  # their KEEPALIVE
        print(json.dumps({"established": True}), flush=True)
        for f in frames:
            conn.sendall(bytes.fromhex(f))
    try:
        while True:
            got = read_msg(conn)
            if got is None:
                print(json.dumps({"closed": True}), flush=True)
                return
            kind, body = got
            out = {"type": kind}
            if kind == 3:
                out["code"], out["subcode"] = body[0], body[1]
            if kind == 5 and len(body) == 4:
                out["afi"], out["subtype"] = body[1], body[2]
            print(json.dumps(out), flush=True)
            if kind == 3:
                return
    except socket.timeout:
        print(json.dumps({"timeout": True}), flush=True)


if __name__ == "__main__":
    main()
