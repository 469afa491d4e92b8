#!/usr/bin/env python3
"""Learned routes through kernel nexthop groups (issue 6, item 2).

A BIRD 2 "hv2" announces N /32s (next-hop-self) to two BIRD 2 route
reflectors, one per fabric path (bridges A and B); l3hvd on hv1 learns them
from both, so each prefix has two paths with ORIGINATOR_ID hv2 and lands on
one nexthop group of two members. Measures, in release:

  install    l3hvd start -> N routes in hv1's table 90 (polled every 50 ms),
             with nexthop_objects = "on" and "off" (RTA_MULTIPATH)
  failover   path B's reflector disables its session with hv1 (BGP Cease):
             - birdc call -> the group's RTM_NEWNEXTHOP (`ip -ts monitor
               nexthop` on hv1), the kernel's notice of the failover write
             - the agent's own fast path (from its log: total, compute and
               kernel write; path B's object deleted, which takes it out
               of the group) and the full pass after it (status JSON)
  anchors    in a fresh namespace, `ip -batch` of the same N routes with
             `nhid G`, the kernel's own `ip nexthop replace` of a group
             that N routes point at (nexthop_compat_mode 1, the kernel's
             default, which notifies every route, and 0), and its `ip
             nexthop del` of the member (the fast path's write).

    sudo python3 benches/nexthop_failover.py [--n 100000] [--runs 3] [--family 6] [--no-off]

--family 6: IPv6 /128s over BGP sessions on IPv6 (the kernel's IPv6 group
replace is the slower one); --no-off: skip the RTA_MULTIPATH agent.

Everything runs in namespaces it creates (l3nh-*), removed on exit."""
import argparse
import atexit
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L3HVD = os.path.join(ROOT, "target/release/l3hvd")
L3HV = os.path.join(ROOT, "target/release/l3hv")
P = f"l3nh{os.getpid()}"
WORK = tempfile.mkdtemp(prefix="l3nh.")
PROCS = []
NAMESPACES = ("sw", "rr1", "rr2", "hv1", "hv2", "raw")
V6 = False
# (path A, path B) addresses of rr, hv1, hv2 and the prefix length, per family.
ADDR = {
    4: {"rr": ("198.51.100.126", "198.51.100.226"), "hv1": ("198.51.100.101", "198.51.100.201"),
        "hv2": ("198.51.100.102", "198.51.100.202"), "len": 25},
    6: {"rr": ("2001:db8:a::126", "2001:db8:b::226"), "hv1": ("2001:db8:a::101", "2001:db8:b::201"),
        "hv2": ("2001:db8:a::102", "2001:db8:b::202"), "len": 64},
}


def addr(who, path):
    return ADDR[6 if V6 else 4][who][path]


def sh(*args, check=True, stdin=None):
    return subprocess.run(
        args, check=check, capture_output=True, text=True, input=stdin
    ).stdout


def ns(name):
    return f"{P}-{name}"


def nx(name, *args, **kw):
    return sh("ip", "netns", "exec", ns(name), *args, **kw)


def cleanup():
    for p in PROCS:
        try:
            p.kill()
            p.wait(timeout=2)
        except Exception:
            pass
    for f in os.listdir(WORK) if os.path.isdir(WORK) else []:
        if f.endswith(".pid"):
            try:
                os.kill(int(open(os.path.join(WORK, f)).read().strip()), signal.SIGKILL)
            except Exception:
                pass
    for n in NAMESPACES:
        subprocess.run(["ip", "netns", "del", ns(n)], capture_output=True)
    shutil.rmtree(WORK, ignore_errors=True)


def prefixes(n):
    if V6:
        for i in range(n):
            yield f"2001:db8:18::{i >> 16:x}:{i & 0xffff:x}/128"
        return
    for i in range(n):
        yield f"198.18.{(i >> 8) & 255}.{i & 255}/32" if i < 65536 else (
            f"198.19.{((i - 65536) >> 8) & 255}.{(i - 65536) & 255}/32"
        )


def setup():
    for n in ("sw", "rr1", "rr2", "hv1", "hv2"):
        sh("ip", "netns", "add", ns(n))
        sh("ip", "-n", ns(n), "link", "set", "lo", "up")
    for br in ("brA", "brB"):
        sh("ip", "-n", ns("sw"), "link", "add", br, "type", "bridge")
        sh("ip", "-n", ns("sw"), "link", "set", br, "up")
    for n, ifname, port, br in (
        ("rr1", "eth0", "p-rr1", "brA"),
        ("rr2", "eth0", "p-rr2", "brB"),
        ("hv1", "a-public", "p-hv1a", "brA"),
        ("hv1", "b-public", "p-hv1b", "brB"),
        ("hv2", "a-public", "p-hv2a", "brA"),
        ("hv2", "b-public", "p-hv2b", "brB"),
    ):
        sh("ip", "-n", ns("sw"), "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns(n))
        sh("ip", "-n", ns("sw"), "link", "set", port, "master", br, "up")
        sh("ip", "-n", ns(n), "link", "set", ifname, "up")
    plen = ADDR[6 if V6 else 4]["len"]
    # hv1's own uplink addresses too for IPv6, without DAD, as a host's
    # network configuration has them before the agent starts (the agent
    # adds missing ones, with DAD: about 2 s before its first session in a
    # fresh namespace, which the install time would otherwise include).
    hv1 = (("hv1", "a-public", 0, "hv1"), ("hv1", "b-public", 1, "hv1")) if V6 else ()
    for n, dev, path, who in (("rr1", "eth0", 0, "rr"), ("rr2", "eth0", 1, "rr"),
                              ("hv2", "a-public", 0, "hv2"), ("hv2", "b-public", 1, "hv2"), *hv1):
        sh("ip", "-n", ns(n), "addr", "add", f"{addr(who, path)}/{plen}", "dev", dev,
           *(["nodad"] if V6 else []))


def bird(name, conf):
    path = os.path.join(WORK, f"{name}.conf")
    open(path, "w").write(conf)
    nx(name, "bird", "-c", path, "-s", os.path.join(WORK, f"{name}.ctl"), "-P", os.path.join(WORK, f"{name}.pid"))


def birdc(name, *cmd):
    return nx(name, "birdc", "-s", os.path.join(WORK, f"{name}.ctl"), *cmd)


def reflectors_and_origin(n):
    fam = "ipv6" if V6 else "ipv4"
    for name, rid, path in (("rr1", "198.51.100.126", 0), ("rr2", "198.51.100.226", 1)):
        me, hv1, hv2 = addr("rr", path), addr("hv1", path), addr("hv2", path)
        bird(name, f"""
router id {rid};
protocol device {{}}
template bgp rrc {{
    local {me} as 65000; rr client; rr cluster id 192.0.2.1; direct;
    ttl security on; hold time 9;
    {fam} {{ import all; export all; add paths tx; next hop keep; }};
}}
protocol bgp hv1 from rrc {{ neighbor {hv1} as 65000; }}
protocol bgp hv2 from rrc {{ neighbor {hv2} as 65000; }}
""")
    routes = "\n".join(f"route {p} blackhole;" for p in prefixes(n))
    bird("hv2", f"""
router id 198.51.100.102;
protocol device {{}}
protocol static {{ {fam}; {routes} }}
protocol bgp rr1 {{ local {addr("hv2", 0)} as 65000; neighbor {addr("rr", 0)} as 65000; direct; ttl security on;
    {fam} {{ import none; export all; next hop self; }}; }}
protocol bgp rr2 {{ local {addr("hv2", 1)} as 65000; neighbor {addr("rr", 1)} as 65000; direct; ttl security on;
    {fam} {{ import none; export all; next hop self; }}; }}
""")


def l3hv_config(mode):
    state = os.path.join(WORK, "state")
    os.makedirs(state, exist_ok=True)
    for f in os.listdir(state):
        os.remove(os.path.join(state, f))
    path = os.path.join(WORK, "l3hv.toml")
    open(path, "w").write(f"""
[hypervisor]
name = "bench"
router_id = "198.51.100.101"
state_dir = "{state}"
[control]
socket = "{WORK}/l3hvd.sock"
[log]
level = "info"
[kernel]
reconcile_interval = "1h"
nexthop_objects = "{mode}"
[bgp]
connect_retry = "100ms"
hold_time = "9s"
[fabrics.public]
table = 90
catch_all = true
subnets = ["198.18.0.0/15"{', "2001:db8:18::/48"' if V6 else ''}]
gateway_v4 = "198.19.255.254"
[fabrics.public.paths.a]
interface = "a-public"
addresses = ["{addr("hv1", 0)}/{ADDR[6 if V6 else 4]["len"]}"]
reflectors = ["{addr("rr", 0)}"]
[fabrics.public.paths.b]
interface = "b-public"
addresses = ["{addr("hv1", 1)}/{ADDR[6 if V6 else 4]["len"]}"]
reflectors = ["{addr("rr", 1)}"]
""")
    return path


def kernel_count(name="hv1"):
    out = subprocess.run(
        ["ip", "-n", ns(name), "-6" if V6 else "-4", "-o", "route", "show", "table", "90", "proto", "203"],
        capture_output=True, text=True,
    ).stdout
    return sum(1 for line in out.splitlines() if line.startswith("2001:db8:18:" if V6 else "198."))


def status():
    out = sh(L3HV, "--socket", f"{WORK}/l3hvd.sock", "status", "--json")
    return json.loads(out)


def run_agent(mode, n):
    """Starts l3hvd; returns (process, log path, install ms)."""
    sh("ip", "-n", ns("hv1"), "route", "flush", "table", "90", check=False)
    sh("ip", "-n", ns("hv1"), "nexthop", "flush", check=False)
    log = os.path.join(WORK, f"l3hvd-{mode}.log")
    t0 = time.monotonic()
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns("hv1"), L3HVD, "--config", l3hv_config(mode)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )
    PROCS.append(p)
    while kernel_count() < n:
        if time.monotonic() - t0 > 120:
            sys.exit(f"l3hvd ({mode}) installed {kernel_count()} of {n} routes:\n" + open(log).read()[-3000:])
        time.sleep(0.05)
    return p, log, (time.monotonic() - t0) * 1e3


def stop(p):
    p.kill()
    p.wait()
    PROCS.remove(p)


def monitor_ts(line):
    m = re.match(r"\[(\S+)\]", line)
    return datetime.datetime.fromisoformat(m.group(1)).timestamp() if m else None


def passes(log):
    return re.sub(r"\x1b\[[0-9;]*m", "", open(log).read()).count("reconciled planned=")


def failover(log, compat, objects=True):
    """Path B's session with hv1 goes down; returns measurements (ms)."""
    nx("hv1", "sysctl", "-qw", f"net.ipv4.nexthop_compat_mode={compat}")
    mon_log = os.path.join(WORK, "monitor.log")
    mon = subprocess.Popen(
        ["ip", "netns", "exec", ns("hv1"), "ip", "-ts", "monitor", "nexthop"],
        stdout=open(mon_log, "w"), stderr=subprocess.STDOUT,
    )
    PROCS.append(mon)
    time.sleep(0.5)
    before = open(log).read().count("nexthop groups updated in place")
    before_passes = passes(log)
    t0 = time.time()
    birdc("rr2", "disable", "hv1")
    group_write = None
    deadline = time.time() + 30
    while time.time() < deadline:
        for line in open(mon_log):
            if " group " in line and "Deleted" not in line:
                group_write = monitor_ts(line)
                break
        fast_done = open(log).read().count("nexthop groups updated in place") > before
        if group_write and fast_done:
            break
        if not objects and passes(log) > before_passes:
            break
        time.sleep(0.05)
    # Let the full pass after the fast path finish.
    time.sleep(3)
    stop(mon)
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(log).read())
    fast = [float(x) for x in re.findall(r"nexthop groups updated in place.*?duration_ms=([\d.]+)", text)]
    fast_compute = [float(x) for x in re.findall(r"nexthop groups updated in place.*?compute_ms=([\d.]+)", text)]
    fast_write = [float(x) for x in re.findall(r"nexthop groups updated in place.*?write_ms=([\d.]+)", text)]
    st = status()
    r = st["last_reconcile"]
    out = {
        "birdc_to_group_write_ms": (group_write - t0) * 1e3 if group_write else None,
        "fast_path_ms": fast[-1] if fast else None,
        "fast_path_compute_ms": fast_compute[-1] if fast_compute else None,
        "fast_path_write_ms": fast_write[-1] if fast_write else None,
        "full_pass_ms": r["duration_ms"],
        "full_pass_compute_ms": r["compute"],
        "full_pass_apply_ms": r["apply"],
        "full_pass_planned": r["planned"],
        "groups": st["nexthops"]["groups"],
    }
    birdc("rr2", "enable", "hv1")
    # Path B relearned (the group has both members again) before the next.
    deadline = time.time() + 60
    while time.time() < deadline and objects and nx("hv1", "ip", "nexthop", "show").count(" via ") < 2:
        time.sleep(0.1)
    if not objects:
        time.sleep(3)
    time.sleep(2)
    nx("hv1", "sysctl", "-qw", "net.ipv4.nexthop_compat_mode=1")
    return out


def raw_anchor(n):
    """ip -batch of the same routes on a group, then the kernel's replace."""
    sh("ip", "netns", "add", ns("raw"))
    try:
        r = ns("raw")
        sh("ip", "-n", r, "link", "add", "r0", "type", "veth", "peer", "name", "r1")
        sh("ip", "-n", r, "link", "add", "r2", "type", "veth", "peer", "name", "r3")
        for i in ("r0", "r1", "r2", "r3", "lo"):
            sh("ip", "-n", r, "link", "set", i, "up")
        plen = ADDR[6 if V6 else 4]["len"]
        nodad = ["nodad"] if V6 else []
        sh("ip", "-n", r, "addr", "add", f"{addr('hv1', 0)}/{plen}", "dev", "r0", *nodad)
        sh("ip", "-n", r, "addr", "add", f"{addr('hv1', 1)}/{plen}", "dev", "r2", *nodad)
        sh("ip", "-n", r, "nexthop", "add", "id", "1", "via", addr("hv2", 0), "dev", "r0", "onlink", "proto", "203")
        sh("ip", "-n", r, "nexthop", "add", "id", "2", "via", addr("hv2", 1), "dev", "r2", "onlink", "proto", "203")
        sh("ip", "-n", r, "nexthop", "add", "id", "10", "group", "1/2", "proto", "203")
        batch = "".join(f"route add {p} nhid 10 table 90 proto 203 metric 32\n" for p in prefixes(n))
        t0 = time.monotonic()
        sh("ip", "-n", r, "-batch", "-", stdin=batch)
        install = (time.monotonic() - t0) * 1e3
        replace, delete = {}, {}
        for compat in (1, 0):
            sh("ip", "netns", "exec", r, "sysctl", "-qw", f"net.ipv4.nexthop_compat_mode={compat}")
            times = []
            for members in ("1", "1/2", "1", "1/2"):
                t0 = time.monotonic()
                sh("ip", "-n", r, "nexthop", "replace", "id", "10", "group", members, "proto", "203")
                times.append((time.monotonic() - t0) * 1e3)
            replace[compat] = times
            # The write l3hvd's fast path makes when the lost member is in
            # no other group: deleting it (the kernel takes it out of its
            # groups); then put back for the next.
            dels = []
            for _ in range(4):
                t0 = time.monotonic()
                sh("ip", "-n", r, "nexthop", "del", "id", "2")
                dels.append((time.monotonic() - t0) * 1e3)
                sh("ip", "-n", r, "nexthop", "add", "id", "2", "via", addr("hv2", 1), "dev", "r2", "onlink", "proto", "203")
                sh("ip", "-n", r, "nexthop", "replace", "id", "10", "group", "1/2", "proto", "203")
            delete[compat] = dels
        return install, replace, delete
    finally:
        sh("ip", "netns", "del", ns("raw"), check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    ap.add_argument("--no-off", action="store_true", help="skip the RTA_MULTIPATH agent")
    a = ap.parse_args()
    global V6
    V6 = a.family == 6
    if os.geteuid() != 0:
        sys.exit("run as root")
    if not os.path.exists(L3HVD):
        sh("cargo", "build", "--release")
    atexit.register(cleanup)
    setup()
    reflectors_and_origin(a.n)
    # Both reflectors hold the N routes before any measurement.
    deadline = time.time() + 120
    while True:
        out = birdc("rr2", "show", "route", "count")
        # One line per table (master4, master6).
        counts = [int(total) for _, total in re.findall(r"(\d+) of (\d+) routes", out)]
        if counts and max(counts) >= a.n:
            break
        if time.time() > deadline:
            sys.exit("the reflector never had the routes:\n" + out + birdc("rr2", "show", "protocols", "all"))
        time.sleep(0.2)
    sh("ip", "netns", "exec", ns("hv1"), "sysctl", "-qw", "net.ipv4.nexthop_compat_mode=1")
    results = {"on": [], "off": [], "failover": [], "failover0": [], "failover_off": []}
    for run in range(a.runs):
        for mode in ("on",) if a.no_off else ("on", "off"):
            p, log, ms = run_agent(mode, a.n)
            results[mode].append(ms)
            time.sleep(2)
            if mode == "on":
                results["failover"].append(failover(log, 1))
                results["failover0"].append(failover(log, 0))
            else:
                results["failover_off"].append(failover(log, 1, objects=False))
            stop(p)
        print(f"run {run + 1}: install on {results['on'][-1]:.0f} ms, "
              f"failover {results['failover'][-1]} compat0 {results['failover0'][-1]} "
              f"off {results['failover_off'][-1] if results['failover_off'] else '-'}", flush=True)
    install, replace, delete = raw_anchor(a.n)
    med = statistics.median
    print(f"\nN = {a.n}, {a.runs} runs (medians, ms)")
    print(f"l3hvd install, nexthop groups (on):   {med(results['on']):.0f}  {sorted(round(x) for x in results['on'])}")
    if results["off"]:
        print(f"l3hvd install, RTA_MULTIPATH (off):   {med(results['off']):.0f}  {sorted(round(x) for x in results['off'])}")
    print(f"ip -batch, same routes with nhid:     {install:.0f}")
    for label, runs in (("groups, compat_mode 1", results["failover"]),
                        ("groups, compat_mode 0", results["failover0"]),
                        ("RTA_MULTIPATH (off)", results["failover_off"])):
        for key in ("birdc_to_group_write_ms", "fast_path_ms", "fast_path_compute_ms", "fast_path_write_ms", "full_pass_ms",
                    "full_pass_compute_ms", "full_pass_apply_ms", "full_pass_planned", "groups"):
            vals = [round(f[key], 1) for f in runs if f[key] is not None]
            print(f"failover [{label}] {key}: {med(vals) if vals else None}  {vals}")
    for compat, times in replace.items():
        print(f"kernel ip nexthop replace (compat_mode={compat}): median {med(times):.1f}  {[round(t, 1) for t in times]}")
    for compat, times in delete.items():
        print(f"kernel ip nexthop del of a member (compat_mode={compat}): median {med(times):.1f}  {[round(t, 1) for t in times]}")
    print("(the kernel anchors include starting `ip` in the namespace, ~2 ms)")


if __name__ == "__main__":
    main()
