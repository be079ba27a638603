#!/usr/bin/env python3
"""Turn one bench/run.sh output directory into the ratio table of issue 5.

usage: report.py OUT_DIR CONNS IDLE_MASTER_CPU_PCT
Reads OUT/{peer,notesd,notesd-keepalive}/table.txt (bench/peer/bench.sh tables),
OUT/oha.txt and OUT/hup.txt; prints both sides and the ratios against the targets.
"""
import os
import re
import sys

out, conns, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])


def table(name):
    """endpoint -> dict(rps, p99) for the CONNS rows, plus worker RSS (MiB) if present."""
    path = os.path.join(out, name, "table.txt")
    rows, rss = {}, []
    if not os.path.exists(path):
        return rows, None
    for line in open(path):
        m = re.match(r"^(nginx-static GET /healthz|GET /healthz|GET /api/notes|POST /api/notes)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", line)
        if m and m.group(2) == conns:
            rows[m.group(1)] = dict(rps=float(m.group(3)), p99=float(m.group(6)), non2xx=m.group(7), sockerr=m.group(8))
        w = re.match(r"^\s+worker\s+\d+\s+([\d.]+)\s+([\d.]+)", line)
        if w:
            rss.append(float(w.group(1)))
    return rows, (sum(rss) / len(rss) if rss else None)


peer, peer_rss = table("peer")
nd, nd_rss = table("notesd")
ka, _ = table("notesd-keepalive")


def val(d, k, f="rps"):
    return d.get(k, {}).get(f)


def ratio(a, b):
    return f"{a / b:.1f}x" if a and b else "-"


print(f"# notesd vs gunicorn peer, {conns} connections, wrk through nginx (see {out})")
print(f"{'endpoint':<22} {'peer req/s':>11} {'notesd':>9} {'ratio':>7} {'notesd+ka':>10} {'ratio':>7}   p99 ms peer / notesd / +ka")
for ep in ("GET /healthz", "GET /api/notes", "POST /api/notes"):
    p, n, k = val(peer, ep), val(nd, ep), val(ka, ep)
    print(f"{ep:<22} {p or '-':>11} {n or '-':>9} {ratio(n, p):>7} {k or '-':>10} {ratio(k, p):>7}   "
          f"{val(peer, ep, 'p99')} / {val(nd, ep, 'p99')} / {val(ka, ep, 'p99')}")
nocache = os.path.join(out, "nocache.wrk.txt")
if os.path.exists(nocache):
    stats = re.search(r"^PEERSTATS.*", open(nocache).read(), re.M)
    if stats:
        f = dict(kv.split("=", 1) for kv in stats.group(0).split()[1:] if "=" in kv)
        p = val(peer, "GET /api/notes")
        try:
            rps = float(f["rps"])
            print(f"{'GET /api/notes, no cache':<22} {p or '-':>11} {'':>9} {'':>7} {round(rps):>10} {ratio(rps, p):>7}   "
                  f"p99 {f.get('p99_ms', '?')} ms (http.list_cache_ms = 0)")
        except (KeyError, ValueError):
            pass
def peerstats(name):
    path = os.path.join(out, name)
    m = re.search(r"^PEERSTATS.*", open(path).read(), re.M) if os.path.exists(path) else None
    return dict(kv.split("=", 1) for kv in m.group(0).split()[1:] if "=" in kv) if m else {}


ceil_proxy = peerstats("ceiling.proxy.txt").get("rps")
ceil_static = peerstats("ceiling.static.txt").get("rps")
if ceil_proxy and ceil_static:
    cp, cs = float(ceil_proxy), float(ceil_static)
    print(f"{'nginx -> floor.c':<22} {round(cp):>11}   the proxy hop's ceiling: {100 * cp / cs:.0f}% of nginx static "
          f"({round(cs)} in the same minute)")
static = val(ka, "nginx-static GET /healthz") or val(nd, "nginx-static GET /healthz")
print(f"{'nginx static':<22} {static or '-':>11}")
print()
print("# targets (issue 5)")
checks = []
g_p, g_k = val(peer, "GET /api/notes"), val(ka, "GET /api/notes")
checks.append(("GET /api/notes >= 25x peer", g_k and g_p and g_k / g_p >= 25, ratio(g_k, g_p)))
p99_p, p99_k = val(peer, "GET /api/notes", "p99"), val(ka, "GET /api/notes", "p99")
checks.append(("GET /api/notes p99 <= 1/10 peer", p99_k and p99_p and p99_k <= p99_p / 10, f"{p99_k} vs {p99_p} ms"))
c_p, c_k = val(peer, "POST /api/notes"), val(ka, "POST /api/notes")
checks.append(("POST /api/notes >= 10x peer", c_k and c_p and c_k / c_p >= 10, ratio(c_k, c_p)))
h_k = val(ka, "GET /healthz")
ceiling = f"; the cheapest upstream (floor.c) gets {100 * float(ceil_proxy) / float(ceil_static):.0f}%" if ceil_proxy and ceil_static else ""
checks.append(("GET /healthz >= 50% nginx static", h_k and static and h_k / static >= 0.5, (f"{100 * h_k / static:.0f}%" if h_k and static else "-") + ceiling))
checks.append(("worker RSS <= 1/5 peer", nd_rss and peer_rss and nd_rss <= peer_rss / 5, f"{nd_rss and round(nd_rss, 1)} vs {peer_rss and round(peer_rss, 1)} MiB"))
checks.append(("idle master < 0.1% CPU", idle < 0.1, f"{idle:.3f}%"))
hup = open(os.path.join(out, "hup.txt")).read().strip() if os.path.exists(os.path.join(out, "hup.txt")) else ""
hv = dict(kv.split("=", 1) for kv in hup.split() if "=" in kv)
try:
    ok = int(hv["non2xx"]) == 0 and int(hv["sockerr"]) == 0 and float(hv["hup_rps"]) >= 0.8 * float(hv["baseline_rps"])
    checks.append(("HUPs under load: 0 failed, >= 80% throughput", ok,
                   f"{hv['non2xx']} non2xx, {hv['sockerr']} socket errors, {100 * float(hv['hup_rps']) / float(hv['baseline_rps']):.0f}% of baseline, nginx {hv['nginx_abnormal']}"))
except (KeyError, ValueError, ZeroDivisionError):
    checks.append(("HUPs under load", False, hup or "not run"))
for name, ok, shown in checks:
    print(f"  [{'ok' if ok else 'MISS'}] {name:<44} {shown}")
if os.path.exists(os.path.join(out, "oha.txt")):
    print()
    print(open(os.path.join(out, "oha.txt")).read().rstrip())
