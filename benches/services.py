#!/usr/bin/env python3
"""DHCPv4 and RS->RA latency on the wire, l3hvd against dnsmasq and radvd,
in the same namespaces and the same run (issue 7's benchmark).

    sudo python3 benches/services.py [--n 100] [--l3hvd target/release/l3hvd]

Topology (namespaces bs-hv, bs-vm; the root namespace is never touched):
    bs-hv: vnet0  <-veth->  eth0 (52:54:00:71:00:05): bs-vm
For l3hvd, vnet0 is an adopted interface of a VM with 203.0.113.5 and
2001:db8:cb00:7105::/64. For dnsmasq/radvd, vnet0 gets 203.0.113.254/24
and fe80::1/64 as in shared/anchors/services. The VM's kernel sends no RS
(router_solicitations=0): only rdisc6 does.

A sniffer (AF_PACKET with kernel timestamps, like tshark) runs on vnet0 in
bs-hv. DISCOVER->OFFER and REQUEST->ACK are matched by xid; each RS is
paired with the next RA from fe80::1. Clients: `busybox udhcpc -i eth0 -n
-q -f -s /bin/true` and `rdisc6 -1 -r 1 -w 1000 eth0`, N times each.
Memory: VmRSS/RssAnon of each server while it serves vnet0.
Prints a Markdown table; the raw samples go to $BS_WORK/results.json.
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

HV, VM = "bs-hv", "bs-vm"
MAC = "52:54:00:71:00:05"
WORK = os.environ.get("BS_WORK", "/tmp/bench-services")

SNIFF = r'''
import socket, struct, sys, json
ETH_P_ALL = 3; SO_TIMESTAMPNS = 35
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
s.bind(("vnet0", 0))
print(json.dumps({"ready": 1}), flush=True)
while True:
    d, anc, _, a = s.recvmsg(4096, 64)
    t = None
    for lvl, typ, data in anc:
        if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
            sec, ns = struct.unpack("qq", data[:16]); t = sec + ns / 1e9
    et = d[12:14]
    if et == b"\x08\x00" and d[23] == 17:           # IPv4 UDP
        ihl = (d[14] & 15) * 4; u = 14 + ihl
        sp, dp = struct.unpack("!HH", d[u:u + 4])
        if {sp, dp} & {67, 68}:
            b = d[u + 8:]
            xid = b[4:8].hex(); mt = None; i = 240
            while i + 1 < len(b):
                if b[i] == 255: break
                if b[i] == 0: i += 1; continue
                if b[i] == 53: mt = b[i + 2]; break
                i += 2 + b[i + 1]
            print(json.dumps({"t": t, "dhcp": mt, "xid": xid}), flush=True)
    elif et == b"\x86\xdd" and d[20] == 58:         # IPv6 ICMPv6
        typ = d[54]
        if typ in (133, 134):
            src = socket.inet_ntop(socket.AF_INET6, d[22:38])
            dst = socket.inet_ntop(socket.AF_INET6, d[38:54])
            print(json.dumps({"t": t, "icmp6": typ, "src": src, "dst": dst}), flush=True)
'''

CONFIG = """
[hypervisor]
name = "bench"
router_id = "198.51.100.101"
state_dir = "{dir}/state"
[control]
socket = "{dir}/l3hvd.sock"
[log]
level = "warn"
[kernel]
reconcile_interval = "1h"
[fabrics.public]
table = 90
catch_all = true
subnets = ["203.0.113.0/24", "2001:db8:cb00:7100::/56"]
gateway_v4 = "203.0.113.254"
[ra]
rdnss = ["2001:db8::53"]
min_interval = "3s"
max_interval = "10s"
"""

VM_JSON = ('{"name":"vm5","interfaces":[{"name":"vnet0","mac":"%s","fabric":"public",'
           '"link":"adopt","ipv4":["203.0.113.5"],"ipv6_prefixes":["2001:db8:cb00:7105::/64"]}]}' % MAC)


def sh(*a, check=True, **kw):
    return subprocess.run(list(a), check=check, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def nx(ns, *a, **kw):
    return sh("ip", "netns", "exec", ns, *a, **kw)


def teardown():
    for ns in (HV, VM):
        out = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for p in out:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sh("ip", "netns", "del", ns, check=False)


def setup(l3hv):
    for ns in (HV, VM):
        sh("ip", "netns", "add", ns)
        nx(ns, "ip", "link", "set", "lo", "up")
    sh("ip", "-n", HV, "link", "add", "vnet0", "type", "veth", "peer", "name", "eth0",
       "address", MAC, "netns", VM)
    nx(VM, "sysctl", "-qw", "net.ipv6.conf.eth0.router_solicitations=0")
    if not l3hv:
        nx(HV, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        sh("ip", "-n", HV, "link", "set", "vnet0", "addrgenmode", "none")
        sh("ip", "-n", HV, "addr", "add", "203.0.113.254/24", "dev", "vnet0")
        sh("ip", "-n", HV, "-6", "addr", "add", "fe80::1/64", "dev", "vnet0", "nodad")
    sh("ip", "-n", HV, "link", "set", "vnet0", "up")
    sh("ip", "-n", VM, "link", "set", "eth0", "up")
    for _ in range(100):
        a = sh("ip", "-n", VM, "-6", "addr", "show", "dev", "eth0", "scope", "link").stdout
        if "inet6" in a and "tentative" not in a:
            return
        time.sleep(0.1)
    raise SystemExit("VM link-local still tentative")


def rss(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))
    return xs[int(k)]


def measure(n, label, procs):
    # To a file, not a pipe: a full pipe would stall the capture.
    path = os.path.join(WORK, f"capture-{label.replace('+', '-')}.jsonl")
    sniff = subprocess.Popen(["ip", "netns", "exec", HV, sys.executable, "-c", SNIFF],
                             stdout=open(path, "w"))
    for _ in range(100):
        if "ready" in open(path).read():
            break
        time.sleep(0.05)
    time.sleep(0.2)
    t0 = time.time()
    for _ in range(3):  # warm-up, not counted (before t0 is reset)
        nx(VM, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-s", "/bin/true", check=False)
    t0 = time.time()
    fails = 0
    for _ in range(n):
        r = nx(VM, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-s", "/bin/true", check=False)
        fails += r.returncode != 0
        time.sleep(0.01)
    for _ in range(3):
        nx(VM, "rdisc6", "-1", "-r", "1", "-w", "1000", "eth0", check=False)
    t1 = time.time()
    for _ in range(n):
        r = nx(VM, "rdisc6", "-1", "-r", "1", "-w", "1000", "eth0", check=False)
        fails += r.returncode != 0
        time.sleep(0.02)
    time.sleep(0.3)
    mem = {name: rss(pid) for name, pid in procs}
    time.sleep(0.2)
    sniff.send_signal(signal.SIGKILL)
    sniff.wait()
    out = open(path).read()
    ev = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    ev = [e for e in ev if "t" in e and e["t"] and e["t"] >= t0]
    d2o, r2a, rs2ra = [], [], []
    pending = {}
    for e in ev:
        if e.get("dhcp") in (1, 3):
            pending[(e["xid"], e["dhcp"])] = e["t"]
        elif e.get("dhcp") in (2, 5):
            q = 1 if e["dhcp"] == 2 else 3
            t = pending.pop((e["xid"], q), None)
            if t is not None:
                (d2o if q == 1 else r2a).append((e["t"] - t) * 1e3)
    rs_t = None
    unicast = 0
    for e in ev:
        if e["t"] < t1:
            continue
        if e.get("icmp6") == 133:
            rs_t = rs_t or e["t"]
        elif e.get("icmp6") == 134 and e["src"] == "fe80::1" and rs_t is not None:
            rs2ra.append((e["t"] - rs_t) * 1e3)
            unicast += not e["dst"].startswith("ff02")
            rs_t = None
    return {"label": label, "discover_offer_ms": d2o, "request_ack_ms": r2a,
            "rs_ra_ms": rs2ra, "ra_unicast": unicast, "client_failures": fails, "memory_kib": mem}


def run_l3hvd(n, binary, cli):
    d = tempfile.mkdtemp(prefix="bs-l3hvd-")
    cfg = os.path.join(d, "l3hv.toml")
    open(cfg, "w").write(CONFIG.format(dir=d))
    setup(True)
    p = subprocess.Popen(["ip", "netns", "exec", HV, binary, "--config", cfg],
                         stdout=open(os.path.join(d, "log"), "w"), stderr=subprocess.STDOUT)
    sock = os.path.join(d, "l3hvd.sock")
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    vm = os.path.join(d, "vm.json")
    open(vm, "w").write(VM_JSON)
    rss_before = rss(p.pid)
    sh(cli, "--config", cfg, "vm", "set", vm)
    time.sleep(1.5)
    r = measure(n, "l3hvd", [("l3hvd", p.pid)])
    r["memory_kib"]["l3hvd_idle_before_vm"] = rss_before
    p.send_signal(signal.SIGKILL)
    p.wait()
    teardown()
    shutil.rmtree(d, ignore_errors=True)
    return r


def run_anchor(n):
    if not (shutil.which("dnsmasq") and shutil.which("radvd")):
        return None
    d = tempfile.mkdtemp(prefix="bs-anchor-")
    setup(False)
    conf = os.path.join(d, "radvd.conf")
    open(conf, "w").write("interface vnet0 { AdvSendAdvert on; MinRtrAdvInterval 3; MaxRtrAdvInterval 10;\n"
                          "  prefix 2001:db8:cb00:7105::/64 { AdvOnLink on; AdvAutonomous on; };\n"
                          "  RDNSS 2001:db8::53 { }; };\n")
    dm = subprocess.Popen(["ip", "netns", "exec", HV, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                           "--interface=vnet0", "--bind-interfaces", "--dhcp-range=203.0.113.0,static",
                           f"--dhcp-host={MAC},203.0.113.5", "--port=0", "--no-resolv", "--no-hosts",
                           "--leasefile-ro", f"--pid-file={d}/dnsmasq.pid", f"--log-facility={d}/dnsmasq.log"])
    rv = subprocess.Popen(["ip", "netns", "exec", HV, "radvd", "--nodaemon", "--config", conf,
                           "--pidfile", f"{d}/radvd.pid", "--logmethod", "stderr"],
                          stderr=open(f"{d}/radvd.log", "w"))
    time.sleep(1.5)
    procs = [("dnsmasq", dm.pid)]
    # radvd forks a privsep child: count both.
    kids = sh("pgrep", "-P", str(rv.pid), check=False).stdout.split()
    procs.append(("radvd", rv.pid))
    procs += [("radvd_privsep", int(k)) for k in kids]
    r = measure(n, "dnsmasq+radvd", procs)
    for p in (dm, rv):
        p.send_signal(signal.SIGKILL)
        p.wait()
    teardown()
    shutil.rmtree(d, ignore_errors=True)
    return r


def row(name, xs):
    return f"| {name} | {len(xs)} | {pct(xs, 50):.3f} | {pct(xs, 90):.3f} | {pct(xs, 99):.3f} | {max(xs) if xs else float('nan'):.3f} |"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--l3hvd", default="target/release/l3hvd")
    ap.add_argument("--l3hv", default="target/release/l3hv")
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    teardown()
    results = []
    try:
        results.append(run_l3hvd(a.n, os.path.abspath(a.l3hvd), os.path.abspath(a.l3hv)))
        anchor = run_anchor(a.n)
        if anchor:
            results.append(anchor)
    finally:
        teardown()
    json.dump(results, open(os.path.join(WORK, "results.json"), "w"), indent=1)
    print("| measurement (ms) | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|")
    for r in results:
        print(row(f"{r['label']} DISCOVER→OFFER", r["discover_offer_ms"]))
        print(row(f"{r['label']} REQUEST→ACK", r["request_ack_ms"]))
        print(row(f"{r['label']} RS→RA ({r['ra_unicast']} unicast)", r["rs_ra_ms"]))
    print()
    for r in results:
        print(f"{r['label']}: client failures {r['client_failures']}, memory (KiB) {json.dumps(r['memory_kib'])}")


if __name__ == "__main__":
    main()
