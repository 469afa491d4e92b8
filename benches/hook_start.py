#!/usr/bin/env python3
"""Start-to-exit time of `l3hv hook` builds, without an agent.

    benches/hook_start.py [--n 400] [NAME=PATH ...]

Each build runs `hook vm1 prepare begin -` on hooks/example-domain.xml with
a D-Bus configuration whose bus does not exist (exec to a failed connect),
with no configuration file, and (through a `50-l3hv` link) as libvirt calls
it; `/bin/true` is the floor. Builds alternate, each started N times; p50 /
p90 / p99 in ms. No namespace, no network: nothing is connected to.
"""
import argparse, os, statistics, subprocess, sys, tempfile, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=400)
ap.add_argument("builds", nargs="*", help="NAME=PATH (default: target/release/l3hv)")
a = ap.parse_args()
builds = [b.split("=", 1) for b in a.builds] or [["l3hv", os.path.join(REPO, "target/release/l3hv")]]
xml = open(os.path.join(REPO, "hooks/example-domain.xml"), "rb").read()
tmp = tempfile.mkdtemp(prefix="l3hv-hookstart-")
cfg = os.path.join(tmp, "l3hv.toml")
with open(os.path.join(REPO, "packaging/l3hv.toml")) as f:
    text = f.read().replace('bus = "system"', f'bus = "unix:path={tmp}/no-such-bus"')
with open(cfg, "w") as f:
    f.write(text)
cases = {"/bin/true": ["/bin/true"]}
for i, (name, path) in enumerate(builds):
    link = os.path.join(tmp, f"{50 + i}-l3hv")
    os.symlink(os.path.abspath(path), link)
    cases[f"{name}: hook, unreachable bus"] = [path, "--config", cfg, "hook", "vm1", "prepare", "begin", "-"]
    cases[f"{name}: hook, no configuration"] = [path, "--config", "/nonexistent", "hook", "vm1", "prepare", "begin", "-"]
    # By name, the default path: absent on a machine without l3hv installed.
    cases[f"{name}: by hook name"] = [link, "vm1", "prepare", "begin", "-"]
res = {k: [] for k in cases}
for _ in range(a.n):
    for k, argv in cases.items():
        t = time.perf_counter()
        subprocess.run(argv, input=xml, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res[k].append((time.perf_counter() - t) * 1000)
for k, v in res.items():
    v.sort()
    print(f"{k:45s} p50 {statistics.median(v):6.3f}  p90 {v[int(len(v) * 0.9)]:6.3f}  p99 {v[int(len(v) * 0.99)]:6.3f} ms")
for f in os.listdir(tmp):
    os.unlink(os.path.join(tmp, f))
os.rmdir(tmp)
