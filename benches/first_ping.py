#!/usr/bin/env python3
"""Time to first ping (issue 6): an address added to a VM's intent on HV1
until the first echo reply between it and a VM on HV2, through a BIRD 2
route reflector, l3hvd on both hypervisors, on a fabric with no default
route (a learned default would make proxy ARP answer everything and hide
the problem). Both directions, IPv4 and IPv6:

  to-new    vmB (on HV2) pings the new address X from before the intent
            exists: its ARP/NS for X is out before HV2 has X's route.
  from-new  vmA (on HV1) pings vmB from X: the echo leaves once HV1 routes
            X, reaches vmB at once, and vmB's reply needs X resolved on its
            on-link subnet while HV2 may not have X's route yet.

This is the seed's "3 of 10 first pings take a second" (the anchor, test 2:
../shared/anchors/bird-lab): a VM whose ARP (NS) goes unanswered retries
only after a second. Each try adds X to vmA's intent over the control socket
(no CLI process in the measurement), pings every 0.5 ms with a raw socket
and records the first reply; X is then removed everywhere and both VMs'
neighbour entries for it flushed. Reported: intent call -> first reply, and
HV1 route -> first reply (the anchor's metric), p50/p99/max, and how many
tries took more than 500 ms (the one-second stall).

    sudo python3 benches/first_ping.py [--n 1000] [--family 4|6|both]
        [--direction to-new|from-new|both] [--no-whole-subnet]

--no-whole-subnet turns off `arp_whole_subnet` and `nd_whole_subnet` (the
seed's behaviour) for the side-by-side run. Everything runs in namespaces it creates (l3fp*),
removed on exit."""
import argparse
import atexit
import datetime
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L3HVD = os.path.join(ROOT, "target/release/l3hvd")
P = f"l3fp{os.getpid()}"
WORK = tempfile.mkdtemp(prefix="l3fp.")
PROCS = []
NAMES = ("sw", "rr", "hv1", "hv2", "vma", "vmb")
V4 = {"a": "203.0.113.1", "b": "203.0.113.3"}
V6 = {"a": "2001:db8:cb00:7100::1", "b": "2001:db8:cb00:7100::3"}


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def ns(name):
    return f"{P}-{name}"


def nx(name, *args, check=True):
    return sh("ip", "netns", "exec", ns(name), *args, check=check)


def cleanup():
    if os.environ.get("L3FP_KEEP"):
        print(f"kept: namespaces {P}-*, work dir {WORK}")
        return
    for p in PROCS:
        try:
            p.kill()
            p.wait(timeout=2)
        except Exception:
            pass
    pidf = os.path.join(WORK, "bird.pid")
    if os.path.exists(pidf):
        try:
            os.kill(int(open(pidf).read().strip()), signal.SIGKILL)
        except Exception:
            pass
    for n in NAMES:
        subprocess.run(["ip", "netns", "del", ns(n)], capture_output=True)
    shutil.rmtree(WORK, ignore_errors=True)


def setup(whole_subnet):
    for n in NAMES:
        sh("ip", "netns", "add", ns(n))
        sh("ip", "-n", ns(n), "link", "set", "lo", "up")
    sh("ip", "-n", ns("sw"), "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", ns("sw"), "link", "set", "br0", "up")
    for n, ifn in (("rr", "eth0"), ("hv1", "a-public"), ("hv2", "a-public")):
        sh("ip", "-n", ns("sw"), "link", "add", f"p-{n}", "type", "veth", "peer", "name", ifn, "netns", ns(n))
        sh("ip", "-n", ns("sw"), "link", "set", f"p-{n}", "master", "br0", "up")
        sh("ip", "-n", ns(n), "link", "set", ifn, "up")
    sh("ip", "-n", ns("rr"), "addr", "add", "198.51.100.126/25", "dev", "eth0")
    sh("ip", "-n", ns("rr"), "addr", "add", "2001:db8:c633:6400::126/120", "dev", "eth0", "nodad")
    conf = os.path.join(WORK, "bird.conf")
    with open(conf, "w") as f:
        f.write("""router id 198.51.100.126;
protocol device {}
template bgp rrc {
    local 198.51.100.126 as 65000; rr client; rr cluster id 198.51.100.126;
    direct; ttl security on;
    ipv4 { import all; export all; add paths tx; next hop keep; };
    ipv6 { import all; export all; add paths tx; next hop keep; };
}
protocol bgp hv1 from rrc { neighbor 198.51.100.101 as 65000; }
protocol bgp hv2 from rrc { neighbor 198.51.100.102 as 65000; }
""")
    nx("rr", "bird", "-c", conf, "-s", os.path.join(WORK, "bird.ctl"), "-P", os.path.join(WORK, "bird.pid"))
    for i, vm in ((1, "a"), (2, "b")):
        hv = f"hv{i}"
        d = os.path.join(WORK, hv)
        os.makedirs(d)
        with open(os.path.join(d, "l3hv.toml"), "w") as f:
            f.write(f"""[hypervisor]
name = "{hv}"
router_id = "198.51.100.10{i}"
state_dir = "{d}/state"
[control]
socket = "{d}/l3hvd.sock"
[log]
level = "warn"
[kernel]
reconcile_interval = "1h"
[bgp]
connect_retry = "100ms"
[bfd]
enabled = false
[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24", "2001:db8:cb00:7100::/64"]
gateway_v4 = "203.0.113.254"
ipv6_mode = "shared-dhcpv6"
arp_whole_subnet = {"true" if whole_subnet else "false"}
nd_whole_subnet = {"true" if whole_subnet else "false"}
[fabrics.public.paths.a]
interface = "a-public"
addresses = ["198.51.100.10{i}/25", "2001:db8:c633:6400::10{i}/120"]
reflectors = ["198.51.100.126"]
""")
        log = open(os.path.join(d, "l3hvd.log"), "w")
        PROCS.append(subprocess.Popen(["ip", "netns", "exec", ns(hv), L3HVD, "--config",
                                       os.path.join(d, "l3hv.toml")], stdout=log, stderr=log))
        # The VM: a veth the agent adopts, addressed as DHCP/DHCPv6 would.
        vmn = f"vm{vm}"
        sh("ip", "-n", ns(hv), "link", "add", f"{vmn}0", "type", "veth", "peer", "name", "eth0", "netns", ns(vmn))
        sh("ip", "-n", ns(vmn), "link", "set", "eth0", "up")
        sh("ip", "-n", ns(vmn), "addr", "add", V4[vm] + "/24", "dev", "eth0")
        sh("ip", "-n", ns(vmn), "addr", "add", V6[vm] + "/64", "dev", "eth0", "nodad")
        sh("ip", "-n", ns(vmn), "route", "add", "default", "via", "203.0.113.254")
        sh("ip", "-n", ns(vmn), "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
    for i in (1, 2):
        for _ in range(600):
            if os.path.exists(sock(i)):
                break
            time.sleep(0.05)
        set_vm(i, "a" if i == 1 else "b", [])
    for _ in range(600):
        peers = [call(i, {"method": "peers"}) for i in (1, 2)]
        if all('"Established"' in json.dumps(p) for p in peers):
            break
        time.sleep(0.05)
    else:
        sys.exit("sessions not established")
    # Each VM's route on the other hypervisor, and one ping each way, so the
    # only thing left to resolve in a try is X.
    for _ in range(200):
        if V4["a"] in nx("hv2", "ip", "route", "show", "table", "90") and \
                V6["a"] in nx("hv2", "ip", "-6", "route", "show", "table", "90") and \
                V4["b"] in nx("hv1", "ip", "route", "show", "table", "90"):
            break
        time.sleep(0.05)
    for dst in (V4["b"], V6["b"]):
        for _ in range(50):
            if subprocess.run(["ip", "netns", "exec", ns("vma"), "ping", "-c", "1", "-W", "1", dst],
                              capture_output=True).returncode == 0:
                break
        else:
            sys.exit(f"vma cannot reach {dst}")


def sock(i):
    return os.path.join(WORK, f"hv{i}", "l3hvd.sock")


def call(i, req):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock(i))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def set_vm(i, vm, extra):
    v4 = [V4[vm]] + [x for x in extra if ":" not in x]
    v6 = [V6[vm]] + [x for x in extra if ":" in x]
    r = call(i, {"method": "set_vm", "vm": {"name": f"vm{vm}", "interfaces": [
        {"name": f"vm{vm}0", "mac": f"52:54:00:00:00:0{1 if vm == 'a' else 3}", "fabric": "public",
         "link": "adopt", "ipv4": v4, "ipv6": v6}]}})
    if "error" in json.dumps(r).lower():
        sys.exit(f"set_vm: {r}")


# ------------------------------------------------------------------ pinger
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    c = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    c = (c >> 16) + (c & 0xffff)
    c += c >> 16
    return ~c & 0xffff


def pinger(src, dst, timeout):
    """Inside a VM namespace: an echo every 0.5 ms from src to dst; prints
    `ready`, then `reply <epoch>` for the first reply (or `timeout`)."""
    v6 = ":" in dst
    if v6:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        s.bind((src, 0))
        req, rep = 128, 129
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.bind((src, 0))
        req, rep = 8, 0
    s.setblocking(False)
    ident = os.getpid() & 0xffff
    seq = 0
    print("ready", flush=True)
    t_end = time.time() + timeout
    next_send = time.time()
    while time.time() < t_end:
        now = time.time()
        if now >= next_send:
            seq = (seq + 1) & 0xffff
            body = struct.pack("!HH", ident, seq) + bytes(56)
            pkt = struct.pack("!BBH", req, 0, 0) + body
            if not v6:  # the kernel fills in ICMPv6 checksums itself
                pkt = struct.pack("!BBH", req, 0, checksum(pkt)) + body
            try:
                s.sendto(pkt, (dst, 0))
            except OSError:
                pass  # no route / neighbour yet: keep trying
            next_send = max(next_send + 0.0005, now)
        r, _, _ = select.select([s], [], [], max(0.0, next_send - time.time()))
        if not r:
            continue
        try:
            data, addr = s.recvfrom(2048)
        except BlockingIOError:
            continue
        t = time.time()
        icmp = data if v6 else data[(data[0] & 0xF) * 4:]
        if addr[0] == dst and icmp[0] == rep and struct.unpack("!H", icmp[4:6])[0] == ident:
            print(f"reply {t:.6f}", flush=True)
            return
    print("timeout", flush=True)


class Pinger:
    def __init__(self, vm, src, dst, timeout=5):
        self.p = subprocess.Popen(["ip", "netns", "exec", ns(vm), sys.executable, os.path.abspath(__file__),
                                   "_ping", src, dst, str(timeout)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        PROCS.append(self.p)
        line = self.p.stdout.readline().strip()
        if line != "ready":
            sys.exit(f"pinger: {line!r}")

    def wait(self):
        out = self.p.stdout.read()
        self.p.wait()
        m = re.search(r"reply (\d+\.\d+)", out)
        return float(m.group(1)) if m else None


class Monitor:
    """`ip -ts -o monitor route` in a namespace (both families)."""

    def __init__(self, name):
        self.path = os.path.join(WORK, f"monitor-{name}.txt")
        self.f = open(self.path, "w")
        self.p = subprocess.Popen(["ip", "netns", "exec", ns(name), "ip", "-ts", "-o", "monitor", "route"],
                                  stdout=self.f, stderr=subprocess.DEVNULL)
        PROCS.append(self.p)
        self.pos = 0

    def first(self, prefix, after):
        pat = re.compile(r"^\[(\S+)\]\s+" + re.escape(prefix) + r"\s")
        with open(self.path) as f:
            f.seek(self.pos)
            for line in f:
                m = pat.match(line)
                if m and "Deleted" not in line:
                    t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                    if t >= after:
                        return t
        return None

    def skip(self):
        self.f.flush()
        self.pos = os.path.getsize(self.path)


def route_gone(hv, x):
    fam = "-6" if ":" in x else "-4"
    return x not in nx(hv, "ip", fam, "route", "show", "table", "90", check=False)


def one_try(k, fam, direction, m1, m2):
    if fam == 4:
        x = f"203.0.113.{100 + k % 100}"
        peer = V4["b"]
        nx("vma", "ip", "addr", "add", x + "/32", "dev", "eth0")
    else:
        x = f"2001:db8:cb00:7100::{0x1000 + k % 1000:x}"
        peer = V6["b"]
        nx("vma", "ip", "-6", "addr", "add", x + "/128", "dev", "eth0", "nodad")
    if direction == "to-new":
        pg = Pinger("vmb", peer, x)
    else:
        pg = Pinger("vma", x, peer)
    time.sleep(0.02)  # the first ARP/NS for X is out, unanswered
    m1.skip()
    m2.skip()
    t0 = time.time()
    set_vm(1, "a", [x])
    t_rep = pg.wait()
    t_hv1 = m1.first(x, t0 - 0.001)
    t_hv2 = m2.first(x, t0 - 0.001)
    # Back to the start: X gone from both kernels and both VMs' caches.
    set_vm(1, "a", [])
    for _ in range(500):
        if route_gone("hv2", x):
            break
        time.sleep(0.002)
    fam_flag = "-6" if fam == 6 else "-4"
    nx("vma", "ip", fam_flag, "addr", "del", x + ("/128" if fam == 6 else "/32"), "dev", "eth0")
    for vm in ("vma", "vmb"):
        nx(vm, "ip", fam_flag, "neigh", "del", x, "dev", "eth0", check=False)
    return {
        "x": x,
        "call_to_reply_ms": (t_rep - t0) * 1e3 if t_rep else None,
        "hv1_route_to_reply_ms": (t_rep - t_hv1) * 1e3 if (t_rep and t_hv1) else None,
        "call_to_hv1_route_ms": (t_hv1 - t0) * 1e3 if t_hv1 else None,
        "hv1_route_to_hv2_route_ms": (t_hv2 - t_hv1) * 1e3 if (t_hv1 and t_hv2) else None,
    }


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))]


def summary(rows, key):
    xs = [r[key] for r in rows if r[key] is not None]
    lost = len(rows) - len(xs)
    if not xs:
        return f"no replies ({lost} tries)"
    stalls = sum(1 for x in xs if x > 500)
    return (f"p50 {statistics.median(xs):.2f} ms, p99 {pct(xs, 0.99):.2f} ms, max {max(xs):.1f} ms, "
            f"{stalls} of {len(rows)} over 500 ms, {lost} without reply")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_ping":
        pinger(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--family", choices=["4", "6", "both"], default="both")
    ap.add_argument("--direction", choices=["to-new", "from-new", "both"], default="both")
    ap.add_argument("--no-whole-subnet", action="store_true")
    ap.add_argument("--json", help="write every try here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    setup(not a.no_whole_subnet)
    m1, m2 = Monitor("hv1"), Monitor("hv2")
    time.sleep(0.3)
    fams = [4, 6] if a.family == "both" else [int(a.family)]
    dirs = ["to-new", "from-new"] if a.direction == "both" else [a.direction]
    out = {}
    print(f"arp_whole_subnet = nd_whole_subnet = {not a.no_whole_subnet}; {a.n} tries per case; "
          f"commit {sh('git', '-C', ROOT, 'rev-parse', '--short', 'HEAD', check=False).strip()}")
    for fam in fams:
        for d in dirs:
            rows = [one_try(k, fam, d, m1, m2) for k in range(a.n)]
            out[f"ipv{fam} {d}"] = rows
            print(f"IPv{fam} {d:8}  intent call -> first reply: {summary(rows, 'call_to_reply_ms')}")
            print(f"IPv{fam} {d:8}  HV1 route   -> first reply: {summary(rows, 'hv1_route_to_reply_ms')}")
            print(f"IPv{fam} {d:8}  intent call -> HV1 route:   {summary(rows, 'call_to_hv1_route_ms')}")
            print(f"IPv{fam} {d:8}  HV1 route   -> HV2 route:   {summary(rows, 'hv1_route_to_hv2_route_ms')}",
                  flush=True)
            slow = [r for r in rows if (r["call_to_reply_ms"] or 1e9) > 500]
            for r in slow[:5]:
                print("   slow:", json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
