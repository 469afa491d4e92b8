#!/usr/bin/env python3
"""What kernel IPv6 neighbour proxy entries (NTF_PROXY) cost, against
l3hvd's user-space responder (issue 6, item 5).

    sudo python3 benches/ndp_proxy.py [--quick] [--sizes 0,10000,100000]
        [--ifaces 20] [--samples 300] [--budget 300] [--rm-budget 90]
        [--l3hvd target/release/l3hvd] [--l3hv target/release/l3hv]
        [--json FILE] [--no-responder] [--no-entries]

Run it alone on a quiet machine (/proc/meminfo and /proc/slabinfo are
host-wide, and the kernel's pneigh table is shared by every namespace).
Python 3 standard library, iproute2; root. Only namespaces named
`l3nd<pid>-*` are created, and removed on exit, error or Ctrl-C; the root
namespace is never touched.

Topology, fresh for every size:
    l3nd<pid>-hv: tap0 .. tap19  <-veth->  vm0 .. vm19 :l3nd<pid>-vm
The hv-side ends get what l3hvd gives a VM interface on a `shared-dhcpv6`
fabric (src/reconcile/desired.rs): addr_gen_mode none (created taps) with
fe80::1/64, ipv6 forwarding=1, force_forwarding=1, proxy_ndp=1,
neigh proxy_delay=0, accept_ra=0. The VM namespace sends no RS and does
no DAD; vm0 has 2001:db8:cb00:7100:ffff::5/64 and is the solicitor.

Entries, for N addresses per interface (N = 0 means the baseline: one
probe entry per interface, not counted in programming/memory):
  * addresses 2001:db8:cb00:7100::1:0 + i (a DHCPv6 pool: every address
    has its own solicited-node group), added address-major
    (`neigh add proxy A dev tapK` for the 20 taps, then the next address)
    by `ip -n hv -batch FILE`, chunk after chunk; each chunk is timed,
    which gives the rate curve. Programming stops after --budget seconds;
    what got in is then measured.
  * kernel memory: deltas of Slab/SUnreclaim/MemAvailable of /proc/meminfo
    and the slab caches that grew in /proc/slabinfo; groups joined
    (`ip -6 maddr show dev tap0`); packets the VM side received while the
    entries went in (MLD reports).
  * NS->NA from vm0 with an AF_PACKET socket: a Linux-like NS (to the
    solicited-node group, source link-layer option, hop limit 255); both
    the NS leaving vm0 and the NA arriving carry kernel timestamps
    (SO_TIMESTAMPNS), so the latency is that of the wire. Targets: random
    programmed addresses, the last-added one, the first-added one, one
    with no entry (must stay unanswered), and that miss immediately
    followed by the last-added (its extra cost is what an unanswered NS
    costs the kernel).
  * removal: `neigh del proxy` in random order, chunk after chunk, until
    --rm-budget; the rest is flushed by `ip link set tapK down` (the kernel
    drops a device's proxy entries when it goes down), timed.

Responder: l3hvd (release build) in the hv namespace with a shared-dhcpv6
fabric, the 20 hv-side ends adopted as the interfaces of one VM (only
vm0's interface has an IPv6 address, so tap0 has no proxy entry). NS->NA
for random addresses of the /64, the agent's RSS and CPU time. Then the
interplay with the entries l3hvd still programs: vm1 solicits vm0's
address, for which tap1 has an entry, and every advertisement is recorded
(flags), and whether vm1's RA default route via fe80::1 survives.

--quick: sizes 0, 1000, 5000 with budgets of 120 s and 30 s (about 4 min).
The default run takes about 15 min: 10,000 x 20 entries alone take over
4 min to add (the cost per entry grows with the entries already there).

Prints Markdown; --json writes every number, including the rate curves.
"""
import argparse, ipaddress, json, os, random, re, shutil, signal, struct, subprocess
import sys, tempfile, time

PREFIX = f"l3nd{os.getpid()}-"
HV, VM = PREFIX + "hv", PREFIX + "vm"
NET = "2001:db8:cb00:7100"
VM0_ADDR = NET + ":ffff::5"
MISS = NET + "::dead:beef"            # solicited-node ff02::1:ffad:beef: no entry has it
POOL_BASE = 0x10000                   # entry i = NET::1:0 + i
CHUNK_ADDRS = 250                     # addresses per ip -batch chunk (x ifaces lines)
STARTED = []                          # Popen objects of this run, killed on exit
CREATED_NS = []


def addr(i):
    v = POOL_BASE + i
    return f"{NET}::{v >> 16:x}:{v & 0xffff:x}"


def vm_mac(k):
    return f"52:54:00:6e:00:{k:02x}"


def sh(*a, check=True, **kw):
    r = subprocess.run(list(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(a)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def nx(ns, *a, **kw):
    return sh("ip", "netns", "exec", ns, *a, **kw)


def sysctl(ns, **kv):
    nx(ns, "sysctl", "-qw", *[f"{k.replace('__', '/')}={v}" for k, v in kv.items()])


# --------------------------------------------------------------------------
# namespaces

def teardown(ifaces=0):
    for p in STARTED:
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    STARTED.clear()
    for ns in list(CREATED_NS):
        sh("ip", "netns", "del", ns, check=False)
        CREATED_NS.remove(ns)


def setup(ifaces, hv_gateway=True):
    for ns in (HV, VM):
        sh("ip", "netns", "add", ns)
        CREATED_NS.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    # New interfaces of the VM namespace: quiet (no DAD, no RS, no RA).
    sysctl(VM, **{"net.ipv6.conf.default.accept_dad": 0, "net.ipv6.conf.default.router_solicitations": 0,
                  "net.ipv6.conf.default.accept_ra": 0, "net.ipv6.conf.all.accept_ra": 0})
    sysctl(HV, **{"net.ipv6.conf.default.accept_dad": 0, "net.ipv6.conf.default.accept_ra": 0})
    batch = []
    for k in range(ifaces):
        batch.append(f"link add tap{k} type veth peer name vm{k} address {vm_mac(k)} netns {VM}")
        batch.append(f"link set tap{k} addrgenmode none")
    run_batch(HV, batch)
    kv = {}
    for k in range(ifaces):
        t = f"net.ipv6.conf.tap{k}"
        if hv_gateway:
            kv.update({f"{t}.forwarding": 1, f"{t}.force_forwarding": 1, f"{t}.proxy_ndp": 1,
                       f"{t}.accept_ra": 0, f"net.ipv6.neigh.tap{k}.proxy_delay": 0})
    if kv:
        sysctl(HV, **kv)
    hb, vb = [], []
    for k in range(ifaces):
        if hv_gateway:
            hb.append(f"addr add fe80::1/64 dev tap{k} nodad")
        hb.append(f"link set tap{k} up")
        vb.append(f"link set vm{k} up")
    vb.append(f"addr add {VM0_ADDR}/64 dev vm0 nodad")
    if hv_gateway:
        # The addresses are "routed elsewhere": towards an uplink (a veth
        # whose far end is in hv too, and no neighbour behind fe80::99).
        hb += ["link add up0 type veth peer name up1", "link set up1 up", "link set up0 up",
               f"route add {NET}::/64 via fe80::99 dev up0"]
    run_batch(HV, hb)
    run_batch(VM, vb)


def run_batch(ns, lines):
    with tempfile.NamedTemporaryFile("w", prefix="l3nd-", suffix=".batch", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        path = f.name
    try:
        t0 = time.perf_counter()
        sh("ip", "-n", ns, "-batch", path)
        return time.perf_counter() - t0
    finally:
        os.unlink(path)


# --------------------------------------------------------------------------
# kernel memory

def meminfo():
    out = {}
    for line in open("/proc/meminfo"):
        k, _, v = line.partition(":")
        if k in ("MemAvailable", "MemFree", "Slab", "SUnreclaim", "SReclaimable", "Percpu"):
            out[k] = int(v.split()[0])
    return out


def slabinfo():
    out = {}
    for line in open("/proc/slabinfo").read().splitlines()[2:]:
        f = line.split()
        out[f[0]] = (int(f[1]), int(f[3]))      # active objects, object size
    return out


def slab_delta(a, b):
    d = []
    for name, (n, size) in b.items():
        n0 = a.get(name, (0, size))[0]
        if n - n0:
            d.append((name, n - n0, (n - n0) * size))
    d.sort(key=lambda x: -abs(x[2]))
    return d


def settle(seconds=2.0):
    """Lets MLD report work and RCU frees finish before a memory snapshot."""
    time.sleep(seconds)


def vm_rx_packets():
    j = json.loads(sh("ip", "-n", VM, "-s", "-j", "link", "show").stdout)
    return sum(l.get("stats64", {}).get("rx", {}).get("packets", 0) for l in j if l["ifname"] != "lo")


def link_mac(ns, dev):
    return json.loads(sh("ip", "-n", ns, "-j", "link", "show", dev).stdout)[0]["address"]


def maddr_count(dev):
    """IPv6 groups joined on dev (what `ip -6 maddr show dev` lists). Read
    from /proc/net/igmp6 in one big read(): iproute2 reads it 4 KiB at a
    time and the kernel walks the lists from the start for each read, which
    takes minutes at 100,000s of groups."""
    code = ("import os; f = os.open('/proc/net/igmp6', os.O_RDONLY); b = []\n"
            "while True:\n    c = os.read(f, 1 << 26)\n    if not c: break\n    b.append(c)\n"
            "print(sum(1 for l in b''.join(b).split(b'\\n') if l.split()[1:2] == [%r]))" % dev.encode())
    return int(nx(HV, sys.executable, "-c", code).stdout)


def proxy_count():
    return len(sh("ip", "-n", HV, "-6", "neigh", "show", "proxy").stdout.splitlines())


# --------------------------------------------------------------------------
# the solicitor (runs in the VM namespace)

PROBER = r'''
import json, os, random, select, socket, struct, sys, time
plan = json.load(sys.stdin)
ETH_P_ALL, SO_TIMESTAMPNS, PACKET_OUTGOING = 3, 35, 4
ifname, mac_s, src_s = plan["ifname"], plan["mac"], plan["src"]
mac = bytes.fromhex(mac_s.replace(":", ""))
src = socket.inet_pton(socket.AF_INET6, src_s)

def csum(s, d, icmp):
    b = s + d + struct.pack("!I3xB", len(icmp), 58) + icmp
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return (~t) & 0xffff

def ns_frame(target, source=src, lla=True, unicast=None):
    """To the solicited-node group; or, with unicast = the router's MAC, to
    the target itself (a NUD probe)."""
    t = socket.inet_pton(socket.AF_INET6, target)
    dst = t if unicast else bytes.fromhex("ff0200000000000000000001ff") + t[13:]
    dmac = bytes.fromhex(unicast.replace(":", "")) if unicast else b"\x33\x33\xff" + t[13:]
    icmp = bytearray(struct.pack("!BBHI", 135, 0, 0, 0) + t + ((b"\x01\x01" + mac) if lla else b""))
    struct.pack_into("!H", icmp, 2, csum(source, dst, bytes(icmp)))
    ip = struct.pack("!IHBB", 0x60000000, len(icmp), 58, 255) + source + dst
    return dmac + mac + b"\x86\xdd" + ip + bytes(icmp)

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((ifname, 0))
s.setblocking(False)
# A socket does not see its own frames leaving: send on another one, so
# that `s` timestamps the solicitation as it leaves the interface.
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
tx.bind((ifname, 0))

def drain():
    while True:
        try: s.recv(65535)
        except BlockingIOError: return

def ts(anc):
    for lvl, typ, data in anc:
        if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
            a, b = struct.unpack("qq", data[:16]); return a + b / 1e9
    return None

def probe(frames, want, timeout, linger):
    """Sends frames back to back; returns (t_first_ns_out, [(t, flags, src)]) for NAs about `want`."""
    drain()
    sent = [f[54 + 8:54 + 24] for f in frames]
    for f in frames: tx.send(f)
    wt = socket.inet_pton(socket.AF_INET6, want)
    t_out, nas = None, []
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0: break
        r, _, _ = select.select([s], [], [], left)
        if not r: break
        while True:
            try: d, anc, _, a = s.recvmsg(2048, 64)
            except BlockingIOError: break
            if len(d) < 78 or d[12:14] != b"\x86\xdd" or d[20] != 58: continue
            typ = d[54]
            if a[2] == PACKET_OUTGOING:
                if typ == 135 and t_out is None and d[62:78] == sent[0]: t_out = ts(anc)
                continue
            if typ == 136 and d[62:78] == wt:
                nas.append((ts(anc), d[58], socket.inet_ntop(socket.AF_INET6, d[22:38])))
                end = min(end, time.monotonic() + linger)
    return t_out, nas

out = {}
for name, spec in plan["probes"].items():
    lat, answered, flags, srcs, counts = [], 0, {}, {}, []
    t_start = time.monotonic()
    for i, tg in enumerate(spec["targets"]):
        pre = [ns_frame(p) for p in spec.get("before", [])]
        source = socket.inet_pton(socket.AF_INET6, spec["source"]) if "source" in spec else src
        frames = pre + [ns_frame(tg, source, spec.get("lla", True), spec.get("unicast"))]
        t_out, nas = probe(frames, tg, spec.get("timeout", 0.2), spec.get("linger", 0.0))
        counts.append(len(nas))
        if nas:
            answered += 1
            if t_out is not None and nas[0][0] is not None:
                lat.append((nas[0][0] - t_out) * 1e3)
            for _, f, sa in nas:
                k = "R%dS%dO%d" % (f >> 7 & 1, f >> 6 & 1, f >> 5 & 1)
                flags[k] = flags.get(k, 0) + 1
                srcs[sa] = srcs.get(sa, 0) + 1
        time.sleep(spec.get("spacing", 0.01))
    out[name] = {"n": len(spec["targets"]), "answered": answered, "lat_ms": lat, "flags": flags,
                 "na_sources": srcs, "nas_per_ns": {str(c): counts.count(c) for c in sorted(set(counts))},
                 "seconds": time.monotonic() - t_start}
print(json.dumps(out))
'''


def prober(ifname, k, probes, src=VM0_ADDR):
    plan = {"ifname": ifname, "mac": vm_mac(k), "src": src, "probes": probes}
    p = subprocess.Popen(["ip", "netns", "exec", VM, sys.executable, "-c", PROBER],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    STARTED.append(p)
    out, err = p.communicate(json.dumps(plan))
    STARTED.remove(p)
    if p.returncode != 0:
        raise RuntimeError(f"prober: {err}")
    return json.loads(out)


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))
    return xs[int(k)]


def summary(r):
    lat = r["lat_ms"]
    return {"n": r["n"], "answered": r["answered"], "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else float("nan"), "flags": r["flags"], "nas_per_ns": r["nas_per_ns"]}


# --------------------------------------------------------------------------
# entries

def program(ifaces, n, budget, log):
    """Adds n addresses x ifaces entries, chunk by chunk; stops after budget s."""
    curve, total_s, done = [], 0.0, 0
    deadline_hit = False
    rx0 = vm_rx_packets()
    for start in range(0, n, CHUNK_ADDRS):
        stop = min(n, start + CHUNK_ADDRS)
        lines = [f"neigh add proxy {addr(i)} dev tap{k}" for i in range(start, stop) for k in range(ifaces)]
        dt = run_batch(HV, lines)
        total_s += dt
        done = stop
        curve.append({"entries": done * ifaces, "chunk_entries": len(lines), "chunk_s": dt,
                      "rate_per_s": len(lines) / dt})
        if len(curve) == 1 or len(curve) % 10 == 0 or done == n:
            log(f"    {done * ifaces:>9} entries  {total_s:7.1f} s  chunk rate {len(lines) / dt:9.0f}/s")
        if total_s > budget and done < n:
            deadline_hit = True
            log(f"    budget of {budget} s reached at {done * ifaces} of {n * ifaces} entries")
            break
    settle()
    return {"addresses": done, "entries": done * ifaces, "seconds": total_s, "stopped_by_budget": deadline_hit,
            "curve": curve, "vm_rx_packets": vm_rx_packets() - rx0}


def remove(ifaces, n_done, budget, log):
    pairs = list(range(n_done * ifaces))
    random.Random(6).shuffle(pairs)
    chunk = CHUNK_ADDRS * ifaces
    curve, total_s, removed = [], 0.0, 0
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        lines = [f"neigh del proxy {addr(p // ifaces)} dev tap{p % ifaces}" for p in part]
        dt = run_batch(HV, lines)
        total_s += dt
        removed += len(part)
        curve.append({"remaining_before": len(pairs) - start, "chunk_entries": len(part), "chunk_s": dt,
                      "rate_per_s": len(part) / dt})
        if total_s > budget and removed < len(pairs):
            log(f"    removal budget of {budget} s reached: {removed} of {len(pairs)} removed")
            break
    # The rest: a device going down drops its proxy entries (NETDEV_DOWN).
    left = len(pairs) - removed
    down = []
    t0 = time.perf_counter()
    for k in range(ifaces):
        t1 = time.perf_counter()
        sh("ip", "-n", HV, "link", "set", f"tap{k}", "down")
        down.append(time.perf_counter() - t1)
    flush_s = time.perf_counter() - t0
    log(f"    removed {removed} in {total_s:.1f} s; flushed {left} by link down in {flush_s:.1f} s")
    return {"removed": removed, "seconds": total_s, "curve": curve, "flushed_by_down": left,
            "down_seconds": flush_s, "down_per_tap_s": down}


def run_entries(ifaces, n, samples, budget, rm_budget, log):
    log(f"entries: N = {n} addresses x {ifaces} interfaces")
    setup(ifaces)
    settle(1.0)
    mem0, slab0 = meminfo(), slabinfo()
    maddr0 = maddr_count("tap0")
    res = {"n": n, "ifaces": ifaces, "maddr_tap0_before": maddr0}
    if n:
        res["program"] = program(ifaces, n, budget, log)
        got = res["program"]["addresses"]
    else:
        got = 0
    mem1, slab1 = meminfo(), slabinfo()
    res["proxy_entries"] = proxy_count()
    res["maddr_tap0"] = maddr_count("tap0")
    res["mem_delta_kib"] = {k: mem1[k] - mem0[k] for k in mem0}
    res["slab_delta"] = slab_delta(slab0, slab1)[:8]
    if got:
        # What the entries themselves take: the kmalloc caches that grew by
        # about one object per entry (other caches move with the page cache
        # of whatever else runs on the host).
        grew = [d for d in slab_delta(slab0, slab1)
                if d[0].startswith("kmalloc") and d[1] > 0.5 * got * ifaces]
        res["slab_caches_per_entry"] = [(d[0], round(d[1] / (got * ifaces), 2)) for d in grew]
        res["slab_bytes_per_entry"] = sum(d[2] for d in grew) / (got * ifaces)
        res["sunreclaim_bytes_per_entry"] = res["mem_delta_kib"]["SUnreclaim"] * 1024 / (got * ifaces)
    log(f"    {res['proxy_entries']} entries, {res['maddr_tap0']} groups on tap0, "
        f"Slab {res['mem_delta_kib']['Slab']:+} KiB, SUnreclaim {res['mem_delta_kib']['SUnreclaim']:+} KiB, "
        f"MemAvailable {res['mem_delta_kib']['MemAvailable']:+} KiB")
    if not got:  # the baseline: one probe entry per interface
        run_batch(HV, [f"neigh add proxy {addr(0)} dev tap{k}" for k in range(ifaces)])
        got = 1
    rng = random.Random(n)
    first, last = addr(0), addr(got - 1)
    half = max(50, samples // 2)
    probes = {
        "random": {"targets": [addr(rng.randrange(got)) for _ in range(samples)]},
        "last_added": {"targets": [last] * half},
        "first_added": {"targets": [first] * half},
        "miss": {"targets": [MISS] * half, "timeout": 0.05},
        "miss_then_last": {"targets": [last] * half, "before": [MISS]},
        # A NUD probe: unicast to the target, to tap0's MAC.
        "unicast_last": {"targets": [last] * 20, "unicast": link_mac(HV, "tap0"), "timeout": 0.05},
    }
    res["latency"] = {k: summary(v) for k, v in prober("vm0", 0, probes).items()}
    # ip6_forward() answers a unicast NS for a proxied address only with
    # net.ipv6.conf.all.proxy_ndp=1 (it ignores the interface's value).
    sysctl(HV, **{"net.ipv6.conf.all.proxy_ndp": 1})
    res["latency"]["unicast_last_all_proxy_ndp"] = summary(
        prober("vm0", 0, {"u": probes["unicast_last"]})["u"])
    sysctl(HV, **{"net.ipv6.conf.all.proxy_ndp": 0})
    for k, v in res["latency"].items():
        log(f"    NS->NA {k:15} answered {v['answered']:>3}/{v['n']:<3} p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms")
    if n:
        res["remove"] = remove(ifaces, res["program"]["addresses"], rm_budget, log)
        settle(5.0)
        mem2, slab2 = meminfo(), slabinfo()
        res["mem_after_removal_kib"] = {k: mem2[k] - mem0[k] for k in mem0}
        res["slab_after_removal"] = [d for d in slab_delta(slab0, slab2) if d[0].startswith("kmalloc")][:4]
    teardown()
    return res


# --------------------------------------------------------------------------
# responder

CONFIG = """
[hypervisor]
name = "ndbench"
router_id = "198.51.100.66"
state_dir = "{dir}/state"
[control]
socket = "{dir}/l3hvd.sock"
[log]
level = "warn"
[kernel]
reconcile_interval = "1h"
[bgp]
enabled = false
[bfd]
enabled = false
[fabrics.public]
table = 90
catch_all = true
subnets = ["{net}::/64"]
ipv6_mode = "shared-dhcpv6"
[ra]
min_interval = "3s"
max_interval = "10s"
"""


def proc_stat(pid):
    st = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "VmHWM"):
            st[k + "_kib"] = int(v.split()[0])
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    st["cpu_s"] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    st["threads"] = int(f[17])
    return st


def run_responder(ifaces, samples, l3hvd, l3hv, log):
    log(f"responder: l3hvd, {ifaces} adopted interfaces, no bulk entries")
    d = tempfile.mkdtemp(prefix="l3nd-agent-")
    try:
        cfg = os.path.join(d, "l3hv.toml")
        open(cfg, "w").write(CONFIG.format(dir=d, net=NET))
        setup(ifaces, hv_gateway=False)   # l3hvd sets the taps up itself
        logf = open(os.path.join(d, "log"), "w")
        p = subprocess.Popen(["ip", "netns", "exec", HV, l3hvd, "--config", cfg],
                             stdout=logf, stderr=subprocess.STDOUT)
        STARTED.append(p)
        sock = os.path.join(d, "l3hvd.sock")
        for _ in range(200):
            if os.path.exists(sock) or p.poll() is not None:
                break
            time.sleep(0.05)
        if p.poll() is not None:
            raise RuntimeError("l3hvd exited: " + open(os.path.join(d, "log")).read()[-2000:])
        time.sleep(0.5)
        idle = proc_stat(p.pid)
        vm = {"name": "ndbench", "interfaces": [
            {"name": f"tap{k}", "mac": vm_mac(k), "fabric": "public", "link": "adopt",
             **({"ipv6": [VM0_ADDR]} if k == 0 else {})} for k in range(ifaces)]}
        vmf = os.path.join(d, "vm.json")
        json.dump(vm, open(vmf, "w"))
        sh(l3hv, "--config", cfg, "vm", "set", vmf)
        # Ready when tap0 answers (the responder opens its sockets on its own).
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            r = prober("vm0", 0, {"w": {"targets": [NET + "::1234"], "timeout": 0.2}})
            if r["w"]["answered"]:
                break
        else:
            raise RuntimeError("the responder never answered on tap0")
        entries = proxy_count()
        log(f"    responder up after {time.monotonic() - t0:.1f} s; kernel proxy entries l3hvd made: {entries}")
        before = proc_stat(p.pid)
        rng = random.Random(66)
        rand = [str(ipaddress.IPv6Address((0x20010db8cb007100 << 64) | rng.getrandbits(64))) for _ in range(samples)]
        probes = {
            "random": {"targets": rand},
            "own": {"targets": [VM0_ADDR] * 20, "timeout": 0.05},
            "dad": {"targets": [NET + "::77"] * 20, "source": "::", "lla": False, "timeout": 0.05},
            "off_subnet": {"targets": ["2001:db8:ffff::1"] * 20, "timeout": 0.05},
            "unicast": {"targets": rand[:20], "unicast": link_mac(HV, "tap0"), "timeout": 0.05},
        }
        res = {"entries_l3hvd_made": entries, "idle": idle, "before_probes": before}
        res["latency"] = {k: summary(v) for k, v in prober("vm0", 0, probes).items()}
        after = proc_stat(p.pid)
        res["after_probes"] = after
        res["cpu_us_per_ns"] = (after["cpu_s"] - before["cpu_s"]) / samples * 1e6
        for k, v in res["latency"].items():
            log(f"    NS->NA {k:15} answered {v['answered']:>3}/{v['n']:<3} p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms")
        log(f"    l3hvd RSS {after['VmRSS_kib']} KiB (idle, before the VM: {idle['VmRSS_kib']} KiB), "
            f"CPU {res['cpu_us_per_ns']:.0f} us per NS (tick-granular)")

        # Both answer: tap1 has a kernel entry for vm0's address.
        res["dual"] = dual_answers(l3hv, cfg, vm, vmf, log)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        STARTED.remove(p)
        res["log_tail"] = open(os.path.join(d, "log")).read()[-1500:]
        return res
    finally:
        teardown()
        shutil.rmtree(d, ignore_errors=True)


def dual_answers(l3hv, cfg, vm, vmf, log):
    """vm1, a guest that learned its default route and the on-link /64 from
    l3hvd's RA, talks to vm0's address: tap1 has l3hvd's kernel proxy
    entry for it, and the responder answers too."""
    vm1_addr = NET + ":ffff::6"
    vm["interfaces"][1]["ipv6"] = [vm1_addr]
    json.dump(vm, open(vmf, "w"))
    sh(l3hv, "--config", cfg, "vm", "set", vmf)
    # vm0's address must not be local to the VM namespace (vm1 would reach
    # it through lo). NUD made quick: reachable 0.5-1.5 s, probe after 1 s.
    sh("ip", "-n", VM, "-6", "addr", "del", f"{VM0_ADDR}/64", "dev", "vm0")
    sysctl(VM, **{"net.ipv6.conf.vm1.accept_ra": 1, "net.ipv6.conf.vm1.router_solicitations": 3,
                  "net.ipv6.neigh.vm1.base_reachable_time_ms": 1000,
                  "net.ipv6.neigh.vm1.delay_first_probe_time": 1})
    sh("ip", "-n", VM, "link", "set", "vm1", "down")
    sh("ip", "-n", VM, "link", "set", "vm1", "up")
    sh("ip", "-n", VM, "-6", "addr", "add", f"{vm1_addr}/128", "dev", "vm1", "nodad")  # as DHCPv6 gives it
    ok = False
    for _ in range(150):
        routes = sh("ip", "-n", VM, "-6", "route", "show", "dev", "vm1").stdout
        if "default via fe80::1" in routes and f"{NET}::/64" in routes:
            ok = True
            break
        time.sleep(0.1)
    res = {"routes_before": routes.strip()}
    if not ok:
        log("    vm1 learned no default route and /64 from the RA; interplay check skipped")
        return res
    res["tap1_proxy_entries"] = sh("ip", "-n", HV, "-6", "neigh", "show", "proxy", "dev", "tap1").stdout.split("\n")
    mon_path = tempfile.mktemp(prefix="l3nd-monitor-")
    mon = subprocess.Popen(["ip", "-n", VM, "-6", "-ts", "monitor", "route", "neigh"], stdout=open(mon_path, "w"))
    STARTED.append(mon)
    time.sleep(0.3)
    # The guest's own traffic: the first solicitation, then NUD probes as
    # the entry goes stale (pings go unanswered: vm0's address is not up).
    sh("ip", "netns", "exec", VM, "ping", "-6", "-n", "-q", "-c", "10", "-i", "0.5", "-W", "1", "-I", "vm1",
       VM0_ADDR, check=False)
    res["neigh_after_ping"] = sh("ip", "-n", VM, "-6", "neigh", "show", VM0_ADDR).stdout.strip()
    res["routes_after_ping"] = sh("ip", "-n", VM, "-6", "route", "show", "dev", "vm1").stdout.strip()
    r = prober("vm1", 1, {"dual": {"targets": [VM0_ADDR] * 10, "linger": 0.05, "timeout": 0.3, "spacing": 0.1}},
               src=vm1_addr)["dual"]
    res["probe"] = summary(r)
    res["na_sources"] = r["na_sources"]
    time.sleep(0.3)
    mon.kill()
    mon.wait()
    STARTED.remove(mon)
    lines = open(mon_path).read().splitlines()
    os.unlink(mon_path)
    res["default_deleted"] = [l for l in lines if "Deleted" in l and "default" in l]
    res["neigh_router_flips"] = sum(1 for l in lines if VM0_ADDR in l and "router" in l)
    res["monitor"] = lines[-60:]
    log(f"    vm1 -> {VM0_ADDR} (tap1 has a kernel entry): NAs per NS {r['nas_per_ns']}, flags {r['flags']}, "
        f"sources {r['na_sources']}")
    log(f"    vm1's RA default route deleted {len(res['default_deleted'])} times during 10 pings (5 s) "
        f"and 10 NS; routes now: {sh('ip', '-n', VM, '-6', 'route', 'show', 'default').stdout.strip() or 'none'}")
    return res


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 0,1000,5000, budgets 120 s and 30 s")
    ap.add_argument("--sizes", default="0,10000,100000", help="addresses per interface")
    ap.add_argument("--ifaces", type=int, default=20)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--budget", type=float, help="seconds of programming per size at most (300)")
    ap.add_argument("--rm-budget", type=float, help="seconds of neigh del per size at most (90)")
    ap.add_argument("--l3hvd", default="target/release/l3hvd")
    ap.add_argument("--l3hv", default="target/release/l3hv")
    ap.add_argument("--json")
    ap.add_argument("--no-responder", action="store_true")
    ap.add_argument("--no-entries", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    sizes = [0, 1000, 5000] if a.quick else [int(x) for x in a.sizes.split(",")]
    if a.budget is None:
        a.budget = 120.0 if a.quick else 300.0
    if a.rm_budget is None:
        a.rm_budget = 30.0 if a.quick else 90.0

    def log(m):
        print(m, file=sys.stderr, flush=True)

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (a background job)

    t_start = time.time()
    out = {"kernel": os.uname().release, "uptime_before": open("/proc/loadavg").read().strip(),
           "iproute2": sh("ip", "-V").stdout.strip(), "entries": [], "responder": None}
    try:
        if not a.no_entries:
            for n in sizes:
                out["entries"].append(run_entries(a.ifaces, n, a.samples, a.budget, a.rm_budget, log))
        if not a.no_responder:
            out["responder"] = run_responder(a.ifaces, a.samples, os.path.abspath(a.l3hvd),
                                             os.path.abspath(a.l3hv), log)
    finally:
        teardown()
    out["uptime_after"] = open("/proc/loadavg").read().strip()
    out["seconds"] = time.time() - t_start
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)
    report(out)


def f3(x):
    return "—" if x != x else f"{x:.3f}"


def report(out):
    print(f"kernel {out['kernel']}, {out['iproute2']}; loadavg before {out['uptime_before']}, "
          f"after {out['uptime_after']}; {out['seconds']:.0f} s\n")
    if out["entries"]:
        print("| N per iface | entries | programming (s) | rate first→last chunk (/s) | groups tap0 "
              "| Slab Δ (MiB) | kmalloc B/entry | VM rx pkts (MLD) | removal |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|---|")
        for r in out["entries"]:
            p = r.get("program")
            if p:
                c = p["curve"]
                prog = f"{p['seconds']:.1f}" + (" (budget hit)" if p["stopped_by_budget"] else "")
                rate = f"{c[0]['rate_per_s']:.0f} → {c[-1]['rate_per_s']:.0f}"
                rm = r["remove"]
                rem = (f"{rm['removed']} del in {rm['seconds']:.1f} s; {rm['flushed_by_down']} by link down "
                       f"in {rm['down_seconds']:.1f} s")
                print(f"| {r['n']} | {p['entries']} | {prog} | {rate} | {r['maddr_tap0']} | "
                      f"{r['mem_delta_kib']['Slab'] / 1024:.1f} | {r.get('slab_bytes_per_entry', 0):.0f} | "
                      f"{p['vm_rx_packets']} | {rem} |")
            else:
                print(f"| 0 | 0 | — | — | {r['maddr_tap0']} | — | — | — | — |")
        for r in out["entries"]:
            if r.get("slab_caches_per_entry"):
                c = r["program"]["curve"]
                print(f"N={r['n']}: objects per entry {r['slab_caches_per_entry']}, SUnreclaim "
                      f"{r['sunreclaim_bytes_per_entry']:.0f} B/entry; rate curve (entries: /s) "
                      + ", ".join(f"{x['entries']}: {x['rate_per_s']:.0f}" for x in c[::max(1, len(c) // 8)] + c[-1:]))
        print()
        print("| N per iface | NS→NA (ms) random p50 / p99 | last-added p50 / p99 | first-added p50 / p99 "
              "| miss answered | miss then last-added p50 / p99 | unicast NS answered |")
        print("|---:|---|---|---|---|---|---|")
        for r in out["entries"]:
            L = r["latency"]
            g = lambda k: f"{f3(L[k]['p50_ms'])} / {f3(L[k]['p99_ms'])}"
            print(f"| {r['n']} | {g('random')} | {g('last_added')} | {g('first_added')} | "
                  f"{L['miss']['answered']}/{L['miss']['n']} | {g('miss_then_last')} | "
                  f"{L['unicast_last']['answered']}/{L['unicast_last']['n']} "
                  f"({L['unicast_last_all_proxy_ndp']['answered']}/{L['unicast_last_all_proxy_ndp']['n']} "
                  f"with all.proxy_ndp=1) |")
        print()
    rs = out["responder"]
    if rs:
        L = rs["latency"]
        print(f"responder: NS→NA random address p50 {f3(L['random']['p50_ms'])} ms, p99 {f3(L['random']['p99_ms'])} ms, "
              f"answered {L['random']['answered']}/{L['random']['n']}, flags {L['random']['flags']}; "
              f"own {L['own']['answered']}/{L['own']['n']}, DAD {L['dad']['answered']}/{L['dad']['n']}, "
              f"off-subnet {L['off_subnet']['answered']}/{L['off_subnet']['n']}, "
              f"unicast {L['unicast']['answered']}/{L['unicast']['n']} answered; "
              f"l3hvd VmRSS {rs['after_probes']['VmRSS_kib']} KiB (RssAnon {rs['after_probes']['RssAnon_kib']}), "
              f"{rs['cpu_us_per_ns']:.0f} µs CPU per NS; kernel entries l3hvd made {rs['entries_l3hvd_made']}")
        dd = rs.get("dual") or {}
        if dd.get("probe"):
            print(f"both answering (tap1 entry + responder): NAs per NS {dd['probe']['nas_per_ns']}, "
                  f"flags {dd['probe']['flags']}; vm1's RA default route deleted {len(dd['default_deleted'])} "
                  f"times ({dd['neigh_router_flips']} neighbour updates with the router flag)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        teardown()
        sys.exit(f"interrupted ({e}); namespaces removed")
