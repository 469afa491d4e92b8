#!/usr/bin/env python3
"""BFD failover and recovery (issue 8): a silent fault of one fabric path ->
the kernel's routes no longer use it, on the hypervisor whose path failed
(hv1, its own BFD) and on the remote one (hv2, through the reflector's BFD
and BGP withdraw); the fault removed -> both paths back. l3hvd and BIRD 2
(the anchor's hypervisor setup: kernel protocol with `merge paths`, `learn`,
`next hop self`, `bfd`) as the hypervisor-side speaker, one after the other
on the same topology, at BFD 500 ms x 3 and 100 ms x 3, with 10 and with
100,000 routes via the failed path. Method of ../shared/anchors/bird-lab
(test 3).

Topology (namespaces bfdb<pid>-*): a switch namespace with bridges A and B;
rr1 on A (198.51.100.126) and rr2 on B (198.51.100.226), BIRD 2 route
reflectors with BFD (the anchor's settings); hv1 and hv2 with one uplink per
bridge (a-public 198.51.100.10x/25, b-public 198.51.100.20x/25) and a VM
namespace behind vnet0. hv2 announces N prefixes of 198.18.0.0/15, hv1 N of
100.64.0.0/10 (l3hvd: VMs with `routed` prefixes, 10,000 per `l3hv vm set`;
BIRD: `ip -batch` of `route add P/32 dev vnet0 table 90 metric 10`, learnt
by its kernel protocol, as in the anchor).

The fault: an nftables bridge rule in the switch namespace drops every
frame to and from hv1's port on bridge A (no carrier loss). Timed with
`ip -ts -o monitor route nexthop` in hv1 and hv2 (each event timestamped by
its `ip` process): a prefix has moved when its route, or the nexthop group
it points to (nhid routes), no longer has a next hop on a-public; recovered
when it has both a-public and b-public again. Detection and BFD Up instants
come from the speakers' own logs (l3hvd JSON log; BIRD `debug { states,
events }` with microsecond timestamps); for l3hvd the log also gives
BFD down -> session down -> reconcile pass (planned ops, duration).

    sudo python3 benches/bfd_failover.py --quick     # 10k routes, 2/1 reps
    sudo python3 benches/bfd_failover.py             # 100k routes, 5/3 reps
    options: --big N  --reps-small R  --reps-big R  --bfd 500,100  --load N
             --impl l3hv,bird  --out DIR
    sudo python3 benches/bfd_failover.py --report DIR [DIR...]   # summary only
    L3HV_KERNEL_EXTRA='nexthop_compat_mode = 0' ...   # extra [kernel] lines for l3hvd

Results: DIR (default /tmp/bfdb-results-<time>)/results.json, summary.md
and the daemons' logs and monitor captures. A speaker/timer combination
that does not converge is recorded as not measured and the run goes on;
BFD sessions to rr2 (path b, never faulted) that go Down are counted as
false failures. Everything runs in namespaces
this script creates; they and every process it started are removed on exit
(also on errors and Ctrl-C). Needs root, bird2, nftables, iproute2 and a
release build (target/release/l3hvd, l3hv)."""
import argparse
import atexit
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L3HVD = os.path.join(ROOT, "target/release/l3hvd")
L3HV = os.path.join(ROOT, "target/release/l3hv")
P = f"bfdb{os.getpid()}"
NAMES = ("sw", "rr1", "rr2", "hv1", "hv2", "vm1", "vm3")
PROCS = []       # Popen objects we started
CAPTURES = []    # tcpdump processes (--capture), stopped with SIGINT so the pcap is complete
CAPTURE = False
PIDFILES = []    # pid files of the daemons we started (BIRD forks)
FAILED_DEV, OTHER_DEV = "a-public", "b-public"
FAULT_PORT = "p-hv1a"
CHUNK = 10000    # routed prefixes per `l3hv vm set` (the control socket takes 1 MiB)
GOALS = ("goals: failover within detection + 50 ms at 100,000 routes (the kernel's own "
         "nexthop-group replace takes 27-44 ms there), detection + 5 ms at 10 routes; "
         "recovery < 1 s after BFD is Up again")


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


def ns(name):
    return f"{P}-{name}"


def run(*args, input=None, check=True, timeout=600):
    r = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)[:200]}: rc={r.returncode} {r.stderr.strip()[:500]}")
    return r.stdout


def nx(name, *args, **kw):
    return run("ip", "netns", "exec", ns(name), *args, **kw)


# ------------------------------------------------------------------ cleanup
def kill_pid(pid):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(20):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def teardown():
    """Kills what we started (by PID) and deletes our namespaces."""
    capture_stop()
    for p in PROCS:
        if p.poll() is None:
            kill_pid(p.pid)
            try:
                p.wait(timeout=2)
            except Exception:
                pass
    PROCS.clear()
    for f in PIDFILES:
        try:
            kill_pid(int(open(f).read().split()[0]))
        except (OSError, ValueError):
            pass
    PIDFILES.clear()
    for n in NAMES:
        if not os.path.exists(f"/run/netns/{ns(n)}"):
            continue
        # anything still inside one of our namespaces was started by us
        pids = subprocess.run(["ip", "netns", "pids", ns(n)], capture_output=True, text=True).stdout
        for pid in pids.split():
            kill_pid(int(pid))
        subprocess.run(["ip", "netns", "del", ns(n)], capture_output=True)


def capture_start(work, hv):
    """--capture: tcpdump of the BGP packets on hv's a-public uplink (the
    faulted path: hv1's own sessions on it, and on hv2 the reflector rr1's
    withdraws of hv1's paths), in hv's namespace, to
    <work>/<hv>.a-public.bgp.pcap. `ip netns exec` execs tcpdump, so the
    PID is tcpdump's."""
    path = os.path.join(work, f"{hv}.{FAILED_DEV}.bgp.pcap")
    err_path = os.path.join(work, f"tcpdump.{hv}.log")
    err = open(err_path, "w")
    p = subprocess.Popen(["ip", "netns", "exec", ns(hv), "tcpdump", "-n", "-Z", "root", "-U", "--immediate-mode", "-B", "32768",
                          "-i", FAILED_DEV,
                          "-w", path, "tcp", "port", "179"], stdout=err, stderr=err)
    CAPTURES.append(p)
    PROCS.append(p)
    for _ in range(50):
        if "listening on" in open(err_path).read() or p.poll() is not None:
            break
        time.sleep(0.1)
    if p.poll() is not None:
        raise RuntimeError(f"tcpdump exited: {open(err_path).read().strip()[:300]}")
    log(f"capturing BGP on {hv} {FAILED_DEV} to {path} (tcpdump pid {p.pid})")


def capture_stop():
    for p in CAPTURES:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGINT)
                p.wait(timeout=5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                kill_pid(p.pid)
    CAPTURES.clear()


def on_signal(sig, _frame):
    sys.exit(128 + sig)


# ------------------------------------------------------------------ prefixes
def prefixes(hv, n):
    """The N /32s hv announces: hv2 from 198.18.0.0/15, hv1 from 100.64.0.0/10."""
    out = []
    for k in range(n):
        if hv == "hv2":
            out.append(f"198.{18 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}")
        else:
            out.append(f"100.{64 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}")
    return out


# ------------------------------------------------------------------ topology
def setup(work):
    for n in NAMES:
        run("ip", "netns", "add", ns(n))
        run("ip", "-n", ns(n), "link", "set", "lo", "up")
    for br in ("brA", "brB"):
        run("ip", "-n", ns("sw"), "link", "add", br, "type", "bridge", "mcast_snooping", "0")
        run("ip", "-n", ns("sw"), "link", "set", br, "up")
    for node, ifn, port, br in (("rr1", "eth0", "p-rr1", "brA"), ("rr2", "eth0", "p-rr2", "brB"),
                                ("hv1", "a-public", "p-hv1a", "brA"), ("hv1", "b-public", "p-hv1b", "brB"),
                                ("hv2", "a-public", "p-hv2a", "brA"), ("hv2", "b-public", "p-hv2b", "brB")):
        run("ip", "-n", ns("sw"), "link", "add", port, "type", "veth", "peer", "name", ifn, "netns", ns(node))
        run("ip", "-n", ns("sw"), "link", "set", port, "master", br, "up")
        run("ip", "-n", ns(node), "link", "set", ifn, "up")
    run("ip", "-n", ns("rr1"), "addr", "add", "198.51.100.126/25", "dev", "eth0")
    run("ip", "-n", ns("rr2"), "addr", "add", "198.51.100.226/25", "dev", "eth0")
    for hv, vm, v in (("hv1", "vm1", 1), ("hv2", "vm3", 3)):
        run("ip", "-n", ns(hv), "link", "add", "vnet0", "type", "veth", "peer", "name", "eth0", "netns", ns(vm))
        run("ip", "-n", ns(hv), "link", "set", "vnet0", "up")
        run("ip", "-n", ns(vm), "addr", "add", f"203.0.113.{v}/24", "dev", "eth0")
        run("ip", "-n", ns(vm), "link", "set", "eth0", "up")
        run("ip", "-n", ns(vm), "route", "add", "default", "via", "203.0.113.254")


BIRD_LOG = 'timeformat log "%F %T.%6f";\n'


def bird_start(node, work, conf):
    path = os.path.join(work, f"bird.{node}.conf")
    with open(path, "w") as f:
        f.write(conf)
    pid = os.path.join(work, f"bird.{node}.pid")
    PIDFILES.append(pid)
    nx(node, "bird", "-c", path, "-s", os.path.join(work, f"bird.{node}.ctl"), "-P", pid)


def birdc(node, work, cmd):
    return run("birdc", "-s", os.path.join(work, f"bird.{node}.ctl"), *cmd.split(), check=False, timeout=30)


def reflectors(work, bfd_ms):
    """The anchor's reflectors (rr client, add paths tx, next hop keep, direct,
    ttl security, bfd, error wait time 1,5), IPv4, BFD at bfd_ms x 3."""
    for n, me, pfx in ((1, "198.51.100.126", "198.51.100.10"), (2, "198.51.100.226", "198.51.100.20")):
        conf = f"""log "{work}/bird.rr{n}.log" all;
{BIRD_LOG}router id {me};
protocol device {{ scan time 10; }}
protocol bfd {{ debug {{ states, events }}; interface "*" {{ interval {bfd_ms} ms; multiplier 3; }}; }}
template bgp route_reflector {{
  local as 65000; rr client; rr cluster id {me};
  direct; ttl security yes; bfd yes;
  error wait time 1, 5; error forget time 10;
  debug {{ states, events }};
}}
"""
        for i in (1, 2):
            conf += f"""protocol bgp hv{i} from route_reflector {{
  neighbor {pfx}{i} as 65000;
  ipv4 {{ import all; export all; add paths tx; next hop keep; }};
}}
"""
        bird_start(f"rr{n}", work, conf)


def hv_addresses():
    for i in (1, 2):
        hv = f"hv{i}"
        run("ip", "-n", ns(hv), "addr", "add", f"198.51.100.10{i}/25", "dev", "a-public")
        run("ip", "-n", ns(hv), "addr", "add", f"198.51.100.20{i}/25", "dev", "b-public")


# ------------------------------------------------------------------ speakers
class L3hv:
    name = "l3hv"

    def __init__(self, work, bfd_ms):
        self.work = work
        self.bfd_ms = bfd_ms
        self.n = {"hv1": 0, "hv2": 0}
        self.logs = {}
        for i in (1, 2):
            hv = f"hv{i}"
            d = os.path.join(work, hv)
            os.makedirs(d, exist_ok=True)
            cfg = os.path.join(d, "l3hv.toml")
            with open(cfg, "w") as f:
                f.write(f"""[hypervisor]
name = "{hv}"
router_id = "198.51.100.10{i}"
state_dir = "{d}/state"
[control]
socket = "{d}/l3hvd.sock"
[log]
level = "info,l3hv::bgp::session=debug"
format = "json"
[kernel]
reconcile_interval = "1h"
{os.environ.get("L3HV_KERNEL_EXTRA", "")}
[bfd]
min_tx = "{bfd_ms}ms"
min_rx = "{bfd_ms}ms"
multiplier = 3
[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24", "198.18.0.0/15", "100.64.0.0/10"]
gateway_v4 = "203.0.113.254"
[fabrics.public.paths.a]
interface = "a-public"
addresses = ["198.51.100.10{i}/25"]
reflectors = ["198.51.100.126"]
[fabrics.public.paths.b]
interface = "b-public"
addresses = ["198.51.100.20{i}/25"]
reflectors = ["198.51.100.226"]
""")
            self.logs[hv] = os.path.join(d, "l3hvd.log")
            out = open(self.logs[hv], "w")
            PROCS.append(subprocess.Popen(["ip", "netns", "exec", ns(hv), L3HVD, "--config", cfg],
                                          stdout=out, stderr=out))
        for i, v in ((1, 1), (2, 3)):
            self.vm_set(f"hv{i}", {"name": f"vm{v}", "interfaces": [{
                "name": "vnet0", "mac": f"52:54:00:00:00:0{v}", "fabric": "public", "link": "adopt",
                "ipv4": [f"203.0.113.{v}"]}]})

    def sock(self, hv):
        return os.path.join(self.work, hv, "l3hvd.sock")

    def cli(self, hv, *args, check=True):
        return run(L3HV, "--socket", self.sock(hv), *args, check=check, timeout=120)

    def vm_set(self, hv, vm):
        path = os.path.join(self.work, hv, "vm.json")
        with open(path, "w") as f:
            json.dump(vm, f)
        for _ in range(100):
            if os.path.exists(self.sock(hv)):
                break
            time.sleep(0.1)
        # The CLI gives up after 10 s; a set behind a long pass (100k
        # routes) may take longer. Setting the same VM again is a no-op.
        for attempt in range(30):
            try:
                self.cli(hv, "vm", "set", path)
                return
            except RuntimeError as e:
                if "no answer" not in str(e) or attempt == 29:
                    raise
                log(f"{hv}: vm set {vm['name']}: no answer within 10 s, again")
                time.sleep(2)

    def sessions_up(self):
        for hv in ("hv1", "hv2"):
            out = self.cli(hv, "peers", "--json", check=False)
            try:
                peers = json.loads(out)
            except ValueError:
                return False
            if len(peers) != 2 or not all(p["state"] == "Established" and p["bfd"]["state"] == "up"
                                          for p in peers):
                return False
        return True

    def announce(self, hv, n):
        """hv announces its first n prefixes: VMs bulk0.. with CHUNK routed
        prefixes each, one veth per VM (both ends in hv, carrier up)."""
        pfx = prefixes(hv, n)
        base = 20 if hv == "hv1" else 120
        for c in range(0, n, CHUNK):
            k = c // CHUNK
            ifn = f"rt{k}"
            if subprocess.run(["ip", "-n", ns(hv), "link", "show", ifn], capture_output=True).returncode:
                run("ip", "-n", ns(hv), "link", "add", ifn, "type", "veth", "peer", "name", f"{ifn}p")
                run("ip", "-n", ns(hv), "link", "set", f"{ifn}p", "up")
                run("ip", "-n", ns(hv), "link", "set", ifn, "up")
            via = f"203.0.113.{base + k}"
            hvn = int(hv[-1])
            self.vm_set(hv, {"name": f"bulk{k}", "interfaces": [{
                "name": ifn, "mac": f"52:54:00:{hvn:02x}:{k >> 8:02x}:{(k & 255) + 16:02x}", "fabric": "public",
                "link": "adopt", "ipv4": [via],
                "routed": [{"prefix": f"{p}/32", "via": via} for p in pfx[c:c + CHUNK]]}]})
        self.n[hv] = n

    def stop(self):
        pass


class Bird:
    """The anchor's hypervisor BIRD (setup.sh hv_conf), IPv4, BFD at bfd_ms x 3."""
    name = "bird"

    def __init__(self, work, bfd_ms):
        self.work = work
        self.n = {"hv1": 0, "hv2": 0}
        self.logs = {}
        hv_addresses()
        for i in (1, 2):
            hv = f"hv{i}"
            self.logs[hv] = os.path.join(work, f"bird.{hv}.log")
            conf = f"""log "{self.logs[hv]}" all;
{BIRD_LOG}router id 198.51.100.10{i};
protocol device {{ scan time 10; }}
protocol kernel kernel_public4 {{
  ipv4 {{ preference 200; import where krt_metric < 4294967294; export all; }};
  persist; learn; scan time 10; kernel table 90; merge paths yes;
}}
protocol bfd {{ debug {{ states, events }}; interface "*" {{ interval {bfd_ms} ms; multiplier 3; }}; }}
template bgp rr_client {{
  local as 65000; direct; ttl security yes; bfd yes;
  error wait time 1, 5; error forget time 10;
  debug {{ states, events }};
}}
protocol bgp RR1 from rr_client {{
  neighbor 198.51.100.126 as 65000;
  ipv4 {{ import all; export all; next hop self; add paths rx; }};
}}
protocol bgp RR2 from rr_client {{
  neighbor 198.51.100.226 as 65000;
  ipv4 {{ import all; export all; next hop self; add paths rx; }};
}}
"""
            bird_start(hv, work, conf)
        for hv, v in (("hv1", 1), ("hv2", 3)):
            run("ip", "-n", ns(hv), "route", "add", f"203.0.113.{v}/32", "dev", "vnet0", "table", "90",
                "metric", "10")

    def sessions_up(self):
        for hv in ("hv1", "hv2"):
            out = birdc(hv, self.work, "show protocols")
            if len(re.findall(r"^RR[12]\s.*Established", out, re.M)) != 2:
                return False
            bfd = birdc(hv, self.work, "show bfd sessions")
            if len(re.findall(r"\sUp\s", bfd)) != 2:
                return False
        return True

    def announce(self, hv, n):
        pfx = prefixes(hv, n)[self.n[hv]:]
        data = "".join(f"route add {p}/32 dev vnet0 table 90 metric 10\n" for p in pfx)
        nx(hv, "ip", "-batch", "-", input=data)
        self.n[hv] = n

    def stop(self):
        pass


# ------------------------------------------------------------------ kernel state model
TS = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{6})\]\s*")
BANNER = re.compile(r"^\[(ROUTE|NEXTHOP)\]\s*")
DEV = re.compile(r"\bdev (\S+)")
NHID = re.compile(r"\bnhid (\d+)")


class Model:
    """Which uplinks each watched prefix's route uses in table 90, from
    route lines (RTA_MULTIPATH or single next hop, or nhid N) and nexthop
    lines (single next hops and groups)."""

    def __init__(self, watched):
        self.watched = set(watched)
        self.routes = {}     # prefix -> ("devs", frozenset) | ("nhid", id)
        self.nhs = {}        # id -> ("dev", name) | ("group", [ids])
        self.users = {}      # nhid -> set of prefixes using it directly

    def devs_of_nh(self, nid, depth=0):
        nh = self.nhs.get(nid)
        if nh is None or depth > 3:
            return frozenset()
        if nh[0] == "dev":
            return frozenset([nh[1]]) if nh[1] else frozenset()
        out = set()
        for m in nh[1]:
            out |= self.devs_of_nh(m, depth + 1)
        return frozenset(out)

    def devs(self, p):
        r = self.routes.get(p)
        if r is None:
            return frozenset()
        return r[1] if r[0] == "devs" else self.devs_of_nh(r[1])

    def _set_route(self, p, val):
        old = self.routes.get(p)
        if old and old[0] == "nhid":
            self.users.get(old[1], set()).discard(p)
        if val is None:
            self.routes.pop(p, None)
        else:
            self.routes[p] = val
            if val[0] == "nhid":
                self.users.setdefault(val[1], set()).add(p)

    def route_line(self, line, need_table):
        """Applies one route line; returns the affected prefixes."""
        deleted = line.startswith("Deleted ")
        if deleted:
            line = line[8:]
        p = line.split(" ", 1)[0]
        if p.endswith("/32"):
            p = p[:-3]
        if p not in self.watched:
            return ()
        if need_table and " table 90 " not in line + " ":
            return ()
        if deleted:
            self._set_route(p, None)
        else:
            m = NHID.search(line)
            if m:
                self._set_route(p, ("nhid", int(m.group(1))))
            else:
                self._set_route(p, ("devs", frozenset(DEV.findall(line))))
        return (p,)

    def nexthop_line(self, line):
        deleted = line.startswith("Deleted ")
        if deleted:
            line = line[8:]
        m = re.match(r"id (\d+)\s*(.*)", line)
        if not m:
            return ()
        nid, rest = int(m.group(1)), m.group(2)
        if deleted:
            self.nhs.pop(nid, None)
        else:
            g = re.search(r"\bgroup (\S+)", rest)
            if g:
                self.nhs[nid] = ("group", [int(x.split(",")[0]) for x in g.group(1).split("/")])
            else:
                d = DEV.search(rest)
                self.nhs[nid] = ("dev", d.group(1) if d else None)
        # prefixes on this id or on any group containing it
        ids = {nid} | {g for g, v in self.nhs.items() if v[0] == "group" and nid in v[1]}
        out = set()
        for i in ids:
            out |= self.users.get(i, set())
        return out

    def load(self, hv):
        """A fresh dump of table 90 and the nexthop objects."""
        self.routes, self.nhs, self.users = {}, {}, {}
        for line in run("ip", "-n", ns(hv), "nexthop", "show", check=False).splitlines():
            self.nexthop_line(line.strip())
        for line in run("ip", "-n", ns(hv), "-o", "-4", "route", "show", "table", "90").splitlines():
            self.route_line(line.strip(), need_table=False)

    def count(self):
        moved = both = 0
        for p in self.watched:
            d = self.devs(p)
            if d and FAILED_DEV not in d:
                moved += 1
            if FAILED_DEV in d and OTHER_DEV in d:
                both += 1
        return moved, both


class Monitor:
    """`ip -ts -o monitor route nexthop` in one namespace, written to a file
    and applied to a Model as it is read (no pipe back-pressure)."""

    def __init__(self, hv, watched, path):
        self.hv = hv
        self.model = Model(watched)
        self.path = path
        self.out = open(path, "w")
        # -rcvbuf: as large as rmem_max lets it (8 MiB here); losses show as
        # "No buffer space" lines: once the monitor is quiet, the state is
        # reloaded from a dump and the prefixes whose events were lost are
        # given the time of the last event seen (see resync).
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns(hv), "ip", "-rcvbuf", "67108864", "-ts", "-o",
                                      "monitor", "route", "nexthop"], stdout=self.out, stderr=subprocess.STDOUT)
        PROCS.append(self.proc)
        time.sleep(0.2)
        self.model.load(hv)
        self.f = open(path)
        self.buf = ""
        self.lost = 0
        self.resynced = 0
        self.resync_at = None
        self.events = 0
        self.last_ts = None
        self.last_read = time.time()

    def feed(self, on_change):
        """Reads new lines; on_change(ts, prefixes) for each applied event."""
        chunk = self.f.read()
        if not chunk:
            return
        self.last_read = time.time()
        self.buf += chunk
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            m = TS.match(line)
            if not m:
                if "No buffer space" in line or "ENOBUFS" in line:
                    self.lost += 1
                continue
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1e6
            line = line[m.end():]
            b = BANNER.match(line)
            kind = None
            if b:
                kind = b.group(1)
                line = line[b.end():]
            body = line[8:] if line.startswith("Deleted ") else line
            if kind == "NEXTHOP" or (kind is None and body.startswith("id ")):
                affected = self.model.nexthop_line(line)
            else:
                affected = self.model.route_line(line, need_table=True)
            if affected:
                self.events += 1
                self.last_ts = t
                on_change(t, affected)

    def maybe_resync(self, on_change, quiet=0.5):
        """After lost events and `quiet` s without any: reload from a dump;
        what changed unseen is dated at the last event seen (the kernel
        reports changes in order, so the last one read bounds them unless
        the very last ones were lost)."""
        if self.lost > self.resynced and time.time() - self.last_read > quiet:
            self.resynced = self.lost
            self.resync_at = time.time()   # an upper bound for what changed unseen
            self.model.load(self.hv)
            on_change(self.last_ts or time.time(), self.model.watched)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.out.close()
        self.f.close()


# ------------------------------------------------------------------ logs
def parse_iso(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def parse_bird_ts(line):
    m = re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{6}) ", line)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e6


def read_from(path, offset):
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read().splitlines()
    except OSError:
        return []


def size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def bird_bfd(path, offset, peer, to):
    """First BFD transition of the session to `peer` into state `to` (Up/Down)."""
    for line in read_from(path, offset):
        if f"to {peer} " in line + " " and re.search(rf"changed state from \w+ to {to}\b", line):
            return parse_bird_ts(line)
    return None


def l3hv_events(path, offset):
    """(ts, record) of the agent's JSON log lines since offset."""
    out = []
    for line in read_from(path, offset):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        ts = r.get("timestamp")
        if ts:
            out.append((parse_iso(ts), r))
    return out


def l3hv_timeline(path, offset, peer_ip, t_until):
    """BFD down of the session to peer_ip, its BGP session down, and the
    reconcile passes that followed (start, end, planned), ending by t_until."""
    ev = l3hv_events(path, offset)
    tl = {"bfd_down": None, "session_down": None, "passes": []}
    for t, r in ev:
        msg = r.get("message", "")
        peer = str(r.get("peer", ""))
        if msg == "bfd session" and peer_ip in peer and r.get("to") == "down" and tl["bfd_down"] is None:
            tl["bfd_down"] = t
        elif msg == "session down" and peer_ip in peer and tl["session_down"] is None:
            tl["session_down"] = t
        elif msg == "reconciled" and tl["bfd_down"] is not None and t <= t_until and len(tl["passes"]) < 5:
            d = float(r.get("duration_ms", 0)) / 1e3
            tl["passes"].append({"start": t - d, "end": t, "planned": r.get("planned")})
    return tl


def l3hv_bfd_up(path, offset, peer_ip):
    for t, r in l3hv_events(path, offset):
        if r.get("message") == "bfd session" and peer_ip in str(r.get("peer", "")) and r.get("to") == "up":
            return t
    return None


def l3hv_established(path, offset, peer_ip):
    for t, r in l3hv_events(path, offset):
        if r.get("message") == "established" and peer_ip in str(r.get("peer", "")):
            return t
    return None


def remote_pass(path, offset, t_after):
    """The agent's first reconcile pass ending after t_after (hv2's withdraw pass)."""
    for t, r in l3hv_events(path, offset):
        if r.get("message") == "reconciled" and t >= t_after:
            d = float(r.get("duration_ms", 0)) / 1e3
            return {"start": t - d, "end": t, "planned": r.get("planned")}
    return None


# ------------------------------------------------------------------ measurement
def wait_until(fn, timeout, period=0.5):
    end = time.time() + timeout
    while time.time() < end:
        if fn():
            return True
        time.sleep(period)
    return False


def learnt(hv, pfx):
    m = Model(pfx)
    m.load(hv)
    return sum(1 for p in pfx if m.devs(p)) >= len(pfx)


def converged(n):
    """Both hypervisors hold the other's n prefixes over both paths."""
    for hv, other in (("hv1", "hv2"), ("hv2", "hv1")):
        m = Model(prefixes(other, n))
        m.load(hv)
        if m.count()[1] < n:
            return False
    return True


FAULT = f"""table bridge bfdb_fault {{
  chain forwarding {{ type filter hook forward priority 0; policy accept;
    iifname "{FAULT_PORT}" drop
    oifname "{FAULT_PORT}" drop
  }}
}}
"""


REP_GAP = 2.0


def one_rep(spk, work, n, rep, tag):
    watch = {"hv1": prefixes("hv2", n), "hv2": prefixes("hv1", n)}
    mons = {hv: Monitor(hv, watch[hv], os.path.join(work, f"monitor.{tag}.{hv}.{rep}.txt")) for hv in watch}
    offs = {k: size(v) for k, v in spk.logs.items()}
    rr_log = os.path.join(work, "bird.rr1.log")
    rr_off = size(rr_log)
    row = {"rep": rep}
    t0 = t_r0 = None
    try:
        time.sleep(random.uniform(0.3, 1.3))    # random phase against the BFD timers
        t0 = time.time()
        nx("sw", "nft", "-f", "-", input=FAULT)
        row["nft_s"] = time.time() - t0
        row["t0"] = t0
        moved = {hv: {} for hv in mons}

        def cb(hv):
            def f(t, affected):
                for p in affected:
                    d = mons[hv].model.devs(p)
                    if d and FAILED_DEV not in d and p not in moved[hv]:
                        moved[hv][p] = t
            return f
        end = t0 + 30
        while time.time() < end and any(len(moved[hv]) < n for hv in mons):
            for hv in mons:
                mons[hv].feed(cb(hv))
                mons[hv].maybe_resync(cb(hv))
            time.sleep(0.02)
        for hv in mons:
            ts = sorted(moved[hv].values())
            row[f"{hv}_moved"] = len(ts)
            row[f"{hv}_first"] = ts[0] - t0 if ts else None
            row[f"{hv}_last"] = ts[-1] - t0 if len(ts) == n else None
            row[f"{hv}_events"] = mons[hv].events
            row[f"{hv}_lost"] = mons[hv].lost
            if mons[hv].resync_at and len(ts) == n:
                row[f"{hv}_last_upper"] = max(ts[-1], mons[hv].resync_at) - t0
        # detection instants
        if spk.name == "l3hv":
            tl = l3hv_timeline(spk.logs["hv1"], offs["hv1"], "198.51.100.126",
                               t0 + (row["hv1_last"] if row["hv1_last"] is not None else 30) + 0.5)
            row["hv1_detect"] = tl["bfd_down"] - t0 if tl["bfd_down"] else None
            row["hv1_session_down"] = tl["session_down"] - t0 if tl["session_down"] else None
            row["hv1_passes"] = [{"start": p["start"] - t0, "end": p["end"] - t0, "planned": p["planned"]}
                                 for p in tl["passes"]]
            # the split of hv1's last pass (the failover pass: nothing else
            # changes hv1's RIB while path A is down)
            try:
                last = json.loads(spk.cli("hv1", "status", "--json")).get("last_reconcile") or {}
                row["hv1_last_pass"] = {k: last.get(k) for k in
                                        ("duration_ms", "dump", "sysctls", "compute", "apply", "planned")}
            except (RuntimeError, ValueError):
                pass
        else:
            t = bird_bfd(spk.logs["hv1"], offs["hv1"], "198.51.100.126", "Down")
            row["hv1_detect"] = t - t0 if t else None
        t = bird_bfd(rr_log, rr_off, "198.51.100.101", "Down")
        row["rr1_detect"] = t - t0 if t else None
        if spk.name == "l3hv" and t:
            p = remote_pass(spk.logs["hv2"], offs["hv2"], t)
            row["hv2_pass"] = {"start": p["start"] - t0, "end": p["end"] - t0, "planned": p["planned"]} if p else None
        for hv, det in (("hv1", "hv1_detect"), ("hv2", "rr1_detect")):
            if row.get(det) is not None and row[f"{hv}_last"] is not None:
                row[f"{hv}_after_detect_first"] = row[f"{hv}_first"] - row[det]
                row[f"{hv}_after_detect_last"] = row[f"{hv}_last"] - row[det]
        time.sleep(1.0)
        # recovery
        offs2 = {k: size(v) for k, v in spk.logs.items()}
        back = {hv: {} for hv in mons}

        def cb2(hv):
            def f(t, affected):
                for p in affected:
                    d = mons[hv].model.devs(p)
                    if FAILED_DEV in d and OTHER_DEV in d and p not in back[hv]:
                        back[hv][p] = t
            return f
        for hv in mons:                 # events of the last second
            mons[hv].feed(lambda t, a: None)
        t_r0 = time.time()
        nx("sw", "nft", "delete", "table", "bridge", "bfdb_fault")
        row["t_unblock"] = t_r0
        end = t_r0 + 60
        while time.time() < end and any(len(back[hv]) < n for hv in mons):
            for hv in mons:
                mons[hv].feed(cb2(hv))
                mons[hv].maybe_resync(cb2(hv))
            time.sleep(0.05)
        up = None
        end = t_r0 + 30
        while up is None and time.time() < end:
            if spk.name == "l3hv":
                up = l3hv_bfd_up(spk.logs["hv1"], offs2["hv1"], "198.51.100.126")
            else:
                up = bird_bfd(spk.logs["hv1"], offs2["hv1"], "198.51.100.126", "Up")
            time.sleep(0.1)
        if spk.name == "l3hv":
            est = l3hv_established(spk.logs["hv1"], offs2["hv1"], "198.51.100.126")
            row["bgp_up"] = est - t_r0 if est else None
        row["bfd_up"] = up - t_r0 if up else None
        for hv in mons:
            row[f"{hv}_lost_total"] = mons[hv].lost
            ts = sorted(back[hv].values())
            row[f"{hv}_back"] = ts[-1] - t_r0 if len(ts) == n else None
            row[f"{hv}_back_after_up"] = ts[-1] - up if (up and len(ts) == n) else None
    finally:
        for m in mons.values():
            m.stop()
        subprocess.run(["ip", "netns", "exec", ns("sw"), "nft", "delete", "table", "bridge", "bfdb_fault"],
                       capture_output=True)
    return row


def ms(x):
    return None if x is None else round(x * 1000, 1)


def bench_one(impl, bfd_ms, sizes, args, out, results):
    work = os.path.join(out, f"{impl}-{bfd_ms}")
    shutil.rmtree(work, ignore_errors=True)     # no state (bfd.json, intent) from an earlier run
    os.makedirs(work)
    log(f"=== {impl}, BFD {bfd_ms} ms x 3: topology")
    setup(work)
    if CAPTURE:
        for hv in ("hv1", "hv2"):
            capture_start(work, hv)
    reflectors(work, bfd_ms)
    spk = (L3hv if impl == "l3hv" else Bird)(work, bfd_ms)
    try:
        if not wait_until(spk.sessions_up, 90):
            raise RuntimeError(f"{impl}: BGP/BFD sessions did not come up")
        for n, reps in sizes:
            try:
                measure_size(spk, impl, bfd_ms, work, n, reps, out, results)
            except RuntimeError as e:
                # recorded, and the run goes on with the next speaker/timer
                log(f"[{impl} {bfd_ms}ms n={n}] FAILED: {e}")
                results.append({"impl": impl, "bfd_ms": bfd_ms, "routes": n, "error": str(e)})
                break
    finally:
        flaps = false_downs(spk)
        results.append({"impl": impl, "bfd_ms": bfd_ms, "false_b_downs": flaps})
        log(f"[{impl} {bfd_ms}ms] BFD Down on path b (never faulted): hv1 {flaps['hv1']}, hv2 {flaps['hv2']}")
        spk.stop()
        teardown()


def false_downs(spk):
    """BFD Up -> Down of the sessions to rr2 (path b, never faulted), per hypervisor."""
    out = {}
    for hv, path in spk.logs.items():
        n = 0
        for line in read_from(path, 0):
            if spk.name == "l3hv":
                if '"bfd session"' in line and "198.51.100.226" in line and '"from":"up","to":"down"' in line:
                    n += 1
            elif "to 198.51.100.226 " in line and re.search(r"changed state from Up to Down", line):
                n += 1
        out[hv] = n
    return out


def measure_size(spk, impl, bfd_ms, work, n, reps, out, results):
    t = time.time()
    # one side after the other: hv1's prefixes learnt by hv2 first
    spk.announce("hv1", n)
    if not wait_until(lambda: learnt("hv2", prefixes("hv1", n)), 180, 1.0):
        raise RuntimeError(f"{impl}: hv2 did not learn hv1's {n} routes")
    spk.announce("hv2", n)
    if not wait_until(lambda: converged(n), 180, 1.0):
        raise RuntimeError(f"{impl}: {n} routes did not converge with ECMP")
    log(f"[{impl} {bfd_ms}ms] {n} routes each way converged in {time.time() - t:.1f} s")
    for rep in range(reps):
        time.sleep(REP_GAP)
        if not wait_until(spk.sessions_up, 60) or not wait_until(lambda: converged(n), 120, 1.0):
            raise RuntimeError(f"{impl}: not back to ECMP before rep {rep}")
        row = one_rep(spk, work, n, rep, f"{n}")
        row.update(impl=impl, bfd_ms=bfd_ms, routes=n)
        results.append(row)
        log(f"[{impl} {bfd_ms}ms n={n}] rep {rep}: hv1 detect {ms(row.get('hv1_detect'))} "
            f"first {ms(row['hv1_first'])} last {ms(row['hv1_last'])} | rr1 detect "
            f"{ms(row.get('rr1_detect'))} hv2 first {ms(row['hv2_first'])} last {ms(row['hv2_last'])} "
            f"| BFD up {ms(row['bfd_up'])} hv1 back {ms(row['hv1_back'])} hv2 back {ms(row['hv2_back'])}"
            + (f" | passes {row.get('hv1_passes')} hv2 {row.get('hv2_pass')}" if impl == "l3hv" else ""))
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


# ------------------------------------------------------------------ report
def st(xs, scale=1000):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    med = statistics.median(xs) * scale
    lo, hi = min(xs) * scale, max(xs) * scale
    ints = all(float(x).is_integer() for x in xs)
    f = (lambda v: f"{v:.1f}") if not ints and abs(med) < 20 else (lambda v: f"{v:.0f}")
    if len(xs) == 1:
        return f"{f(med)} (1)"
    return f"{f(med)} [{f(lo)}–{f(hi)}] ({len(xs)})"


def report(results, meta):
    extra = [r for r in results if "rep" not in r]
    results = [r for r in results if "rep" in r]
    keys = sorted({(r["impl"], r["bfd_ms"], r["routes"]) for r in results},
                  key=lambda k: (-k[1], k[2], k[0] != "l3hv"))

    def rows(cols):
        out = []
        for impl, bfd, n in keys:
            rs = [r for r in results if (r["impl"], r["bfd_ms"], r["routes"]) == (impl, bfd, n)]
            cells = [st([c[0](r) for r in rs], c[1]) if isinstance(c, tuple) else st([c(r) for r in rs])
                     for c in cols]
            out.append(f"| {impl} | {bfd}×3 | {n:,} | " + " | ".join(cells) + " |")
        return out

    g = lambda k: (lambda r: r.get(k))
    out = [f"BFD failover, {meta['date']}; {meta['machine']}", "",
           "Times in ms, median [min–max] (n). t=0: the nft bridge rule dropping hv1's port on bridge A "
           "is loaded (failover) / deleted (recovery). hv1 loses path A through its own BFD to rr1; hv2 "
           "through rr1's BFD to hv1 and rr1's withdraw. 'detect' = the BFD Down instant in the detecting "
           "daemon's log (hv1's speaker, rr1's BIRD).", "",
           "**Failover** (routes no longer via a-public):", "",
           "| speaker | BFD | routes | hv1 detect | hv1 first | hv1 last | hv1 last − detect | rr1 detect | "
           "hv2 first | hv2 last | hv2 last − rr1 detect |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    out += rows([g("hv1_detect"), g("hv1_first"), g("hv1_last"), g("hv1_after_detect_last"), g("rr1_detect"),
                 g("hv2_first"), g("hv2_last"), g("hv2_after_detect_last")])
    out += ["", "**Recovery** (every route over both paths again):", "",
            "| speaker | BFD | routes | unblock → hv1 BFD Up | unblock → hv1 BGP up | unblock → hv1 ECMP | "
            "unblock → hv2 ECMP | BFD Up → hv1 ECMP | BFD Up → hv2 ECMP |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    out += rows([g("bfd_up"), g("bgp_up"), g("hv1_back"), g("hv2_back"), g("hv1_back_after_up"),
                 g("hv2_back_after_up")])
    if any(r["impl"] == "l3hv" for r in results):
        keys = [k for k in keys if k[0] == "l3hv"]
        p1 = lambda f: (lambda r: f(r["hv1_passes"][0]) if r.get("hv1_passes") else None)
        p2 = lambda f: (lambda r: f(r["hv2_pass"]) if r.get("hv2_pass") else None)
        out += ["", "**Where l3hvd's time goes** (agent log; pass = the reconcile pass after the session "
                "went down / the withdraw arrived, from its start to its end):", "",
                "| speaker | BFD | routes | hv1 BFD Down → session down | hv1 → pass start | hv1 pass | "
                "hv1 pass ops | hv1 pass end → last route | rr1 BFD Down → hv2 pass start | hv2 pass | "
                "hv2 pass ops |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += rows([
            lambda r: (r["hv1_session_down"] - r["hv1_detect"]) if r.get("hv1_session_down") and r.get("hv1_detect") else None,
            lambda r: (r["hv1_passes"][0]["start"] - r["hv1_detect"]) if r.get("hv1_passes") and r.get("hv1_detect") else None,
            p1(lambda p: p["end"] - p["start"]),
            (lambda r: r["hv1_passes"][0]["planned"] if r.get("hv1_passes") else None, 1),
            lambda r: (r["hv1_last"] - r["hv1_passes"][0]["end"]) if r.get("hv1_passes") and r.get("hv1_last") else None,
            lambda r: (r["hv2_pass"]["start"] - r["rr1_detect"]) if r.get("hv2_pass") and r.get("rr1_detect") else None,
            p2(lambda p: p["end"] - p["start"]),
            (lambda r: r["hv2_pass"]["planned"] if r.get("hv2_pass") else None, 1)])
        lp = lambda k: (lambda r: (r.get("hv1_last_pass") or {}).get(k), 1)
        out += ["", "hv1's failover pass split (`l3hv status --json` last_reconcile, ms):", "",
                "| speaker | BFD | routes | duration | dump | compute (desired + plan) | apply (netlink) | ops |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        out += rows([lp("duration_ms"), lp("dump"), lp("compute"), lp("apply"), lp("planned")])
    lost = [r for r in results if r.get("hv1_lost_total", r.get("hv1_lost")) or
            r.get("hv2_lost_total", r.get("hv2_lost"))]
    if lost:
        out.append(f"\n{len(lost)} repetition(s) ({', '.join(sorted({r['impl'] + ' ' + format(r['routes'], ',') for r in lost}))}) "
                   "lost `ip monitor` events (ENOBUFS; 8 MiB buffer): the state was reloaded once the monitor "
                   "was quiet and the unseen changes dated at the last event read.")
    out += [""]
    for r in extra:
        if "error" in r:
            out.append(f"- {r['impl']} at {r['bfd_ms']} ms x 3, {r['routes']:,} routes: NOT MEASURED: {r['error']}")
        elif "false_b_downs" in r:
            f = r["false_b_downs"]
            out.append(f"- {r['impl']} at {r['bfd_ms']} ms x 3: BFD sessions to rr2 (path b, never faulted) "
                       f"that went Up -> Down: hv1 {f.get('hv1')}, hv2 {f.get('hv2')}")
    out += ["", GOALS]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 routes, 2 and 1 repetitions")
    ap.add_argument("--big", type=int)
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--reps-small", type=int)
    ap.add_argument("--reps-big", type=int)
    ap.add_argument("--bfd", default="500,100")
    ap.add_argument("--impl", default="l3hv,bird")
    ap.add_argument("--out")
    ap.add_argument("--rep-gap", type=float, default=2.0,
                    help="seconds between repetitions (default 2); above 10 BIRD's "
                         "reflector forgets the previous session error (`error forget "
                         "time 10`) and does not double its `error wait time`, which "
                         "otherwise holds up 10-route recoveries by up to 4 s")
    ap.add_argument("--load", type=int, default=0,
                    help="N busy-loop processes (nice 0) for the whole run: BFD under CPU contention")
    ap.add_argument("--capture", action="store_true",
                    help="tcpdump the BGP packets (tcp port 179) on hv1's and hv2's a-public uplinks, "
                         "each in its hypervisor's namespace, to <out>/<impl>-<bfd>/hv1.a-public.bgp.pcap "
                         "and hv2.a-public.bgp.pcap")
    ap.add_argument("--report", nargs="+", metavar="DIR",
                    help="only print the summary of earlier runs' results.json (merged)")
    a = ap.parse_args()
    if a.report:
        results, metas = [], []
        for d in a.report:
            with open(os.path.join(d, "results.json")) as f:
                r = json.load(f)
            if isinstance(r, dict):
                metas.append(r["meta"])
                r = r["reps"]
            results += r
        meta = metas[0] if metas else {"date": "?"}
        meta.setdefault("machine", "?")
        print(report(results, meta))
        return
    global REP_GAP, CAPTURE
    REP_GAP = a.rep_gap
    CAPTURE = a.capture
    big = a.big or (10000 if a.quick else 100000)
    rs = a.reps_small or (2 if a.quick else 5)
    rb = a.reps_big or (1 if a.quick else 3)
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces)")
    for tool in ("bird", "birdc", "nft", "ip") + (("tcpdump",) if a.capture else ()):
        if not shutil.which(tool):
            sys.exit(f"missing {tool} (apt-get install bird2 nftables iproute2)")
    if "l3hv" in a.impl and not (os.access(L3HVD, os.X_OK) and os.access(L3HV, os.X_OK)):
        sys.exit("build first: cargo build --release")
    out = a.out or f"/tmp/bfdb-results-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(out, exist_ok=True)
    atexit.register(teardown)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv}
    bird_v = subprocess.run(["bird", "--version"], capture_output=True, text=True)
    meta["machine"] = (f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}, "
                       f"kernel {os.uname().release}, {(bird_v.stdout + bird_v.stderr).strip()}")
    sizes = [(a.small, rs), (big, rb)]
    results = []
    # CPU contention (the false BFD failures seen with builds running): N
    # busy loops in the root namespace, killed by PID at exit.
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(a.load)]
    atexit.register(lambda: [b.kill() for b in burners])
    meta["load_processes"] = a.load
    t = time.time()
    for bfd in [int(x) for x in a.bfd.split(",")]:
        for impl in a.impl.split(","):
            bench_one(impl, bfd, sizes, a, out, results)
    meta["load_end"] = os.getloadavg()[0]
    meta["duration_s"] = round(time.time() - t)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "reps": results}, f, indent=1)
    text = report(results, meta) + f"\n\nload average at end {meta['load_end']:.1f}; run took {meta['duration_s']} s"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    log(f"results in {out}")


if __name__ == "__main__":
    main()
