#!/usr/bin/env python3
"""Time-to-remote-route (issue 6): a VM intent accepted on HV1 until its host
route is in HV2's kernel, through a BIRD 2 route reflector, l3hvd on both
hypervisors. Measured like the anchor (../shared/anchors/bird-lab, test 1):
`ip -ts -4 -o monitor route` in HV1 and HV2, each event timestamped by its
`ip` process; reported as HV1 kernel -> HV2 kernel (the anchor's metric) and
CLI call -> HV2 kernel (intent accepted -> remote route).

    sudo python3 benches/time_to_route.py [--n 200] [--preload 100000]

--ecmp: a second fabric path (its own switch and BIRD 2 reflector), as in
the seed and the anchor; also reports the time until HV2's nexthop group
for the route has both paths (`ip monitor nexthop`).

--resident: a VM on HV1 that stays for the whole run (203.0.113.253), as
on a hypervisor that already hosts VMs: HV2 then has HV1's nexthop group
before each new route comes, which joins it.

--preload N: the reflector first sends both hypervisors N other learned
routes (/32s of 10.0.0.0/8 from a static protocol), installed before the
measurement starts: the time to one more route with a full table.

Everything runs in namespaces it creates (l3tr-*), removed on exit."""
import argparse
import atexit
import datetime
import json
import os
import re
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
L3HV = os.path.join(ROOT, "target/release/l3hv")
P = f"l3tr{os.getpid()}"
WORK = tempfile.mkdtemp(prefix="l3tr.")
KEEP = None
LOG_LEVEL = "warn"
PRELOAD = 0
RT_MONITORS = False
ECMP = False
PROCS = []


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def ns(name):
    return f"{P}-{name}"


def cleanup():
    for p in PROCS:
        try:
            p.kill()
            p.wait(timeout=2)
        except Exception:
            pass
    for pidf in (os.path.join(WORK, "bird.pid"), os.path.join(WORK, "bird-b.pid")):
        if os.path.exists(pidf):
            try:
                os.kill(int(open(pidf).read().strip()), signal.SIGKILL)
            except Exception:
                pass
    for n in ("sw", "rr", "hv1", "hv2", "sw-b", "rr-b"):
        subprocess.run(["ip", "netns", "del", ns(n)], capture_output=True)
    if KEEP:
        # The agents' logs and the monitor captures, for a breakdown.
        shutil.copytree(WORK, KEEP, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.sock", "*.ctl"))
    shutil.rmtree(WORK, ignore_errors=True)


def fabric_path(sw, rr, uplink, net, static=""):
    """A fabric path: switch namespace `sw` (a bridge), reflector namespace
    `rr` running BIRD 2 at `net`.126/25 (the hypervisors are .101 and .102,
    on `uplink`), with `static` added to its configuration. The files of a
    reflector are named after its namespace (bird.conf for "rr")."""
    for n in (sw, rr):
        sh("ip", "netns", "add", ns(n))
        sh("ip", "-n", ns(n), "link", "set", "lo", "up")
    sh("ip", "-n", ns(sw), "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", ns(sw), "link", "set", "br0", "up")
    for n, ifn in ((rr, "eth0"), ("hv1", uplink), ("hv2", uplink)):
        sh("ip", "-n", ns(sw), "link", "add", f"p-{n}", "type", "veth", "peer", "name", ifn, "netns", ns(n))
        sh("ip", "-n", ns(sw), "link", "set", f"p-{n}", "master", "br0", "up")
        sh("ip", "-n", ns(n), "link", "set", ifn, "up")
    sh("ip", "-n", ns(rr), "addr", "add", f"{net}.126/25", "dev", "eth0")
    name = "bird" if rr == "rr" else f"bird-{rr.removeprefix('rr-')}"
    conf = os.path.join(WORK, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""router id {net}.126;
protocol device {{}}
""" + static + f"""template bgp rrc {{
    local {net}.126 as 65000; rr client; rr cluster id {net}.126;
    direct; ttl security on;
    ipv4 {{ import all; export all; add paths tx; next hop keep; }};
}}
protocol bgp hv1 from rrc {{ neighbor {net}.101 as 65000; }}
protocol bgp hv2 from rrc {{ neighbor {net}.102 as 65000; }}
""")
    sh("ip", "netns", "exec", ns(rr), "bird", "-c", conf, "-s", os.path.join(WORK, f"{name}.ctl"),
       "-P", os.path.join(WORK, f"{name}.pid"))


def setup():
    for n in ("hv1", "hv2"):
        sh("ip", "netns", "add", ns(n))
        sh("ip", "-n", ns(n), "link", "set", "lo", "up")
    static = ""
    if PRELOAD:
        routes = os.path.join(WORK, "preload.routes")
        with open(routes, "w") as f:
            f.writelines(f"route 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32 via 198.51.100.120;\n"
                         for i in range(1, PRELOAD + 1))
        static = f'protocol static s4 {{\n    ipv4;\n    include "{routes}";\n}}\n'
    fabric_path("sw", "rr", "a-public", "198.51.100", static)
    if ECMP:
        # Fabric path b: its own switch and reflector.
        fabric_path("sw-b", "rr-b", "b-public", "100.64.0")
    PRELOAD_SUBNET = ', "10.0.0.0/8"' if PRELOAD else ""
    for i in (1, 2):
        d = os.path.join(WORK, f"hv{i}")
        os.makedirs(d)
        with open(os.path.join(d, "l3hv.toml"), "w") as f:
            f.write(f"""[hypervisor]
name = "hv{i}"
router_id = "198.51.100.10{i}"
state_dir = "{d}/state"
[control]
socket = "{d}/l3hvd.sock"
[log]
level = "{LOG_LEVEL}"
[kernel]
reconcile_interval = "1h"
[bgp]
connect_retry = "100ms"
[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24"{PRELOAD_SUBNET}]
gateway_v4 = "203.0.113.254"
[fabrics.public.paths.a]
interface = "a-public"
addresses = ["198.51.100.10{i}/25"]
reflectors = ["198.51.100.126"]
""" + (f"""[fabrics.public.paths.b]
interface = "b-public"
addresses = ["100.64.0.10{i}/25"]
reflectors = ["100.64.0.126"]
""" if ECMP else ""))
        log = open(os.path.join(d, "l3hvd.log"), "w")
        PROCS.append(subprocess.Popen(["ip", "netns", "exec", ns(f"hv{i}"), L3HVD, "--config",
                                       os.path.join(d, "l3hv.toml")], stdout=log, stderr=log))
    for i in (1, 2):
        sock = os.path.join(WORK, f"hv{i}", "l3hvd.sock")
        for _ in range(600):
            out = subprocess.run([L3HV, "--socket", sock, "peers", "--json"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.count('"Established"') >= (2 if ECMP else 1):
                break
            time.sleep(0.05)
        else:
            sys.exit(f"hv{i}: session not established")
    if PRELOAD:
        for i in (1, 2):
            for _ in range(1200):
                out = sh("ip", "-n", ns(f"hv{i}"), "-4", "-o", "route", "show", "table", "90", "proto", "203")
                if out.count("\n") >= PRELOAD:
                    break
                time.sleep(0.1)
            else:
                sys.exit(f"hv{i}: the {PRELOAD} preloaded routes never reached the kernel")
        time.sleep(1)
        print(f"preloaded: {PRELOAD} learned routes in both hypervisors' kernels")


class Monitor:
    def __init__(self, name):
        self.path = os.path.join(WORK, f"monitor-{name}.txt")
        self.f = open(self.path, "w")
        rt = ["chrt", "-f", "10"] if RT_MONITORS else []
        self.p = subprocess.Popen(rt + ["ip", "netns", "exec", ns(name), "ip", "-ts", "-4", "-o", "monitor", "route"],
                                  stdout=self.f, stderr=subprocess.DEVNULL)
        PROCS.append(self.p)

    def first(self, prefix, after):
        """Timestamp (epoch s) of the first non-deletion event for prefix."""
        found = self.first_line(prefix, after)
        return found and found[0]

    def first_line(self, prefix, after):
        """(timestamp, line) of the first non-deletion event for prefix."""
        return next(iter(self.lines(prefix, after)), None)

    def lines(self, prefix, after):
        """(timestamp, line) of every non-deletion event for prefix."""
        pat = re.compile(r"^\[(\S+)\]\s+" + re.escape(prefix) + r"\s")
        out = []
        with open(self.path) as f:
            for line in f:
                m = pat.match(line)
                if m and "Deleted" not in line:
                    t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                    if t >= after:
                        out.append((t, line))
        return out


class NexthopMonitor:
    """`ip -ts -o monitor nexthop` in a namespace: when a group got a second
    member."""

    def __init__(self, name):
        self.path = os.path.join(WORK, f"nexthops-{name}.txt")
        self.f = open(self.path, "w")
        rt = ["chrt", "-f", "10"] if RT_MONITORS else []
        self.p = subprocess.Popen(rt + ["ip", "netns", "exec", ns(name), "ip", "-ts", "-o", "monitor", "nexthop"],
                                  stdout=self.f, stderr=subprocess.DEVNULL)
        PROCS.append(self.p)

    def multipath(self, group, after, route_at):
        """When `group` had two or more members for a route that came at
        `route_at`: `route_at` if its last event before then gave it two
        (the group existed, with both paths, before the route came: a
        resident VM of the same origin), else the first event after `after`
        that does."""
        pat = re.compile(r"^\[(\S+)\]\s+id " + re.escape(group) + r" group (\S+)")
        last = None
        with open(self.path) as f:
            for line in f:
                m = pat.match(line)
                if not m or "Deleted" in line:
                    continue
                t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                if t <= route_at:
                    last = "/" in m.group(2)
                if t >= after and "/" in m.group(2):
                    return route_at if last else t
        return route_at if last else None


class Capture:
    """BGP on the reflector's port (both directions), kernel timestamps:
    splits HV1 kernel -> HV2 kernel into HV1 (route to UPDATE on the wire),
    the reflector (UPDATE in to UPDATE out) and HV2 (UPDATE to route)."""

    def __init__(self, rr="rr"):
        if not shutil.which("tcpdump"):
            sys.exit("--capture needs tcpdump (apt-get install tcpdump)")
        self.path = os.path.join(WORK, f"{rr}.bgp.pcap")
        self.p = subprocess.Popen(["ip", "netns", "exec", ns(rr), "tcpdump", "-n", "-Z", "root", "-U",
                                   "--immediate-mode", "-i", "eth0", "-w", self.path, "tcp port 179"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        PROCS.append(self.p)

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.p.kill()

    def segments(self):
        """(time, source IPv4, TCP payload) of every segment with data."""
        out = []
        with open(self.path, "rb") as f:
            head = f.read(24)
            if len(head) < 24:
                return out
            endian = "<" if head[:4] == b"\xd4\xc3\xb2\xa1" else ">"
            while True:
                rec = f.read(16)
                if len(rec) < 16:
                    break
                sec, usec, incl, _ = struct.unpack(endian + "IIII", rec)
                frame = f.read(incl)
                if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
                    continue
                ip = frame[14:]
                ihl = (ip[0] & 15) * 4
                tcp = ip[ihl:]
                if len(tcp) < 20:
                    continue
                payload = tcp[(tcp[12] >> 4) * 4:]
                if payload:
                    out.append((sec + usec / 1e6, socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]),
                                payload))
        return out

    @staticmethod
    def first(segs, src, dst, prefix, after):
        """First segment src -> dst after `after` carrying the /32 NLRI of
        `prefix` (announcement or withdrawal: the announcement comes first)."""
        needle = bytes([32]) + socket.inet_aton(prefix)
        for t, s, d, payload in segs:
            if t >= after and s == src and d == dst and needle in payload:
                return t
        return None


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--keep", metavar="DIR", help="copy the agents' logs and the captures here at exit")
    ap.add_argument("--capture", action="store_true",
                    help="tcpdump BGP at the reflector and split the time into HV1, reflector, HV2")
    ap.add_argument("--log", default="warn", help="the agents' log level (info: a line per pass)")
    ap.add_argument("--preload", type=int, default=0, metavar="N",
                    help="N other learned routes installed on both hypervisors first")
    ap.add_argument("--ecmp", action="store_true",
                    help="a second fabric path and reflector; also time HV2's route to both paths")
    ap.add_argument("--resident", action="store_true",
                    help="keep one VM on HV1 for the whole run (its nexthop group exists on HV2)")
    ap.add_argument("--bin", metavar="DIR", help="l3hvd and l3hv from DIR (default target/release)")
    ap.add_argument("--rt-monitors", action="store_true",
                    help="run the two `ip monitor`s at real-time priority: each reads its event when the "
                         "kernel sends it, not when a core is free (HV1's would otherwise wait for the "
                         "agent sending the UPDATE, which flatters HV1 kernel -> HV2 kernel)")
    a = ap.parse_args()
    global KEEP, LOG_LEVEL, PRELOAD, L3HVD, L3HV, RT_MONITORS, ECMP
    if a.bin:
        L3HVD, L3HV = os.path.join(a.bin, "l3hvd"), os.path.join(a.bin, "l3hv")
    KEEP, LOG_LEVEL, PRELOAD, RT_MONITORS, ECMP = a.keep, a.log, a.preload, a.rt_monitors, a.ecmp
    atexit.register(cleanup)
    setup()
    m1, m2 = Monitor("hv1"), Monitor("hv2")
    nh2 = NexthopMonitor("hv2") if ECMP else None
    cap = Capture() if a.capture else None
    # With --ecmp, fabric path b's reflector too: the second path's split.
    cap_b = Capture("rr-b") if a.capture and ECMP else None
    time.sleep(0.5)
    samples = []
    s1 = os.path.join(WORK, "hv1", "l3hvd.sock")
    if a.resident:
        path = os.path.join(WORK, "resident.json")
        with open(path, "w") as f:
            json.dump({"name": "resident", "interfaces": [{"name": "tres", "mac": "52:54:00:00:ff:01",
                                                           "fabric": "public", "ipv4": ["203.0.113.253"]}]}, f)
        subprocess.run([L3HV, "--socket", s1, "vm", "set", path], check=True, capture_output=True)
        want = 2 if ECMP else 1
        for _ in range(100):
            out = sh("ip", "-n", ns("hv2"), "-4", "-o", "route", "show", "table", "90", "203.0.113.253")
            group = re.search(r"\bnhid (\d+)", out)
            members = group and sh("ip", "-n", ns("hv2"), "nexthop", "show", "id", group.group(1))
            if members and members.count("/") + 1 >= want:
                break
            time.sleep(0.05)
        else:
            sys.exit("the resident VM's route never reached HV2 on every path")
    kk, ck, ke = [], [], []
    both_samples = []
    for i in range(a.n):
        x = i % 250 + 1
        prefix = f"203.0.113.{x}"
        vm = {"name": f"vm{i}", "interfaces": [{"name": f"t{i}", "mac": "52:54:00:00:%02x:%02x" % (i >> 8, i & 255 or 1),
                                               "fabric": "public", "ipv4": [prefix]}]}
        path = os.path.join(WORK, "vm.json")
        with open(path, "w") as f:
            json.dump(vm, f)
        t0 = time.time()
        subprocess.run([L3HV, "--socket", s1, "vm", "set", path], check=True, capture_output=True)
        t_remote = None
        deadline = time.time() + 5
        while time.time() < deadline:
            t_remote = m2.first(prefix, t0)
            if t_remote:
                break
            time.sleep(0.01)
        t_local = m1.first(prefix, t0)
        if t_remote and t_local:
            kk.append((t_remote - t_local) * 1e3)
            ck.append((t_remote - t0) * 1e3)
            samples.append((prefix, t0, t_local, t_remote))
        if nh2 and t_remote and t_local:
            # The route points at its origin's group: ECMP once the group
            # has both paths (maybe already when the route came). A new
            # origin's route may point at one path's object first, then
            # be moved to the group its second path creates: ECMP from
            # the first route event on a group of two.
            t_both = None
            while time.time() < deadline:
                for t_line, line in m2.lines(prefix, t0):
                    group = re.search(r"\bnhid (\d+)", line)
                    t_group = group and nh2.multipath(group.group(1), t0, t_line)
                    if t_group:
                        t_both = max(t_group, t_line)
                        break
                if t_both:
                    break
                time.sleep(0.01)
            if t_both:
                ke.append((t_both - t_local) * 1e3)
                both_samples.append((prefix, t0, t_local, t_both))
        subprocess.run([L3HV, "--socket", s1, "vm", "remove", f"vm{i}"], check=True, capture_output=True)
        time.sleep(0.05)
    print(f"samples: {len(kk)} of {a.n}")
    parts = {}
    if cap:
        time.sleep(0.2)
        cap.stop()
        segs = cap.segments()
        hv1, hv2, rr = "198.51.100.101", "198.51.100.102", "198.51.100.126"
        for prefix, t0, t_local, t_remote in samples:
            t_in = cap.first(segs, hv1, rr, prefix, t0)
            t_out = t_in and cap.first(segs, rr, hv2, prefix, t_in)
            if t_in and t_out:
                # Independent of HV1's `ip monitor`, which reads its event
                # late when HV1's cores are busy sending the UPDATE.
                parts.setdefault("CLI call -> UPDATE at the reflector", []).append((t_in - t0) * 1e3)
                parts.setdefault("HV1 kernel -> UPDATE at the reflector", []).append((t_in - t_local) * 1e3)
                parts.setdefault("reflector: UPDATE in -> UPDATE out", []).append((t_out - t_in) * 1e3)
                parts.setdefault("UPDATE out of the reflector -> HV2 kernel", []).append((t_remote - t_out) * 1e3)
        print(f"captured: {len(parts.get('reflector: UPDATE in -> UPDATE out', []))} of {len(samples)}")
    if cap_b:
        cap_b.stop()
        segs = cap_b.segments()
        hv1, hv2 = "100.64.0.101", "100.64.0.102"
        worst = []
        for prefix, t0, t_local, t_both in both_samples:
            t_in = cap_b.first(segs, hv1, "100.64.0.126", prefix, t0)
            t_out = t_in and cap_b.first(segs, "100.64.0.126", hv2, prefix, t_in)
            if t_in and t_out:
                worst.append(((t_both - t_local) * 1e3, (t_in - t_local) * 1e3, (t_out - t_in) * 1e3,
                              (t_both - t_out) * 1e3, (t_out - t0) * 1e3))
                parts.setdefault("path b: HV1 kernel -> UPDATE at reflector b", []).append((t_in - t_local) * 1e3)
                parts.setdefault("path b: reflector b in -> out", []).append((t_out - t_in) * 1e3)
                parts.setdefault("path b: UPDATE out of reflector b -> group of two", []).append(
                    (t_both - t_out) * 1e3)
        for total, h1, r, h2, since in sorted(worst)[-5:]:
            print(f"slowest to both paths: {total:.2f} ms = HV1 {h1:.2f} + reflector b {r:.2f} + HV2 {h2:.2f}"
                  f" (b's UPDATE left reflector b {since:.2f} ms after the CLI call)")
    both = [("HV1 kernel -> HV2 kernel, both paths (group of two)", ke)] if ECMP else []
    for name, xs in (("HV1 kernel -> HV2 kernel", kk), *both, ("CLI call -> HV2 kernel", ck), *parts.items()):
        if xs:
            print(f"{name}: median {statistics.median(xs):.2f} ms, p99 {pct(xs, 0.99):.2f} ms, "
                  f"min {min(xs):.2f}, max {max(xs):.2f} ({len(xs)} samples)")


if __name__ == "__main__":
    main()
