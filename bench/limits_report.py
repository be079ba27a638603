#!/usr/bin/env python3
"""The table of bench/limits.sh: every row as a ratio to its reference in the same run.

usage: limits_report.py DIR   (DIR = <run>/limits, as written by bench/limits.sh)
"""
import json
import os
import sys

D = sys.argv[1]


def stats(name):
    """The PEERSTATS fields of one wrk run, or None."""
    try:
        with open(os.path.join(D, name)) as f:
            for line in f:
                if line.startswith("PEERSTATS"):
                    return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    except OSError:
        pass
    return None


def rps(name):
    s = stats(name)
    return s["rps"] if s else None


def errors(s):
    return int(s["non2xx"] + s["connect"] + s["read"] + s["write"] + s["timeout"])


def rounds(prefix):
    """The result files of one row's interleaved rounds: PREFIX*.txt, in order."""
    return [f for f in sorted(os.listdir(D)) if f.startswith(prefix) and f.endswith(".txt")]


def best(prefix):
    """The best req/s of the runs named PREFIX*.txt (interleaved rounds), and their count."""
    xs = [rps(f) for f in rounds(prefix)]
    xs = [x for x in xs if x]
    return (max(xs) if xs else None), len(xs)


def tps(name):
    try:
        with open(os.path.join(D, name)) as f:
            for line in f:
                if line.startswith("tps"):
                    return float(line.split()[2])
    except OSError:
        pass
    return None


def best_tps(prefix):
    """The best tps of the pgbench runs named PREFIX*.txt (interleaved rounds)."""
    xs = [tps(f) for f in rounds(prefix)]
    xs = [x for x in xs if x]
    return max(xs) if xs else None


def runs(prefix, value):
    """Every round's figure, for the table: "a / b"."""
    return " / ".join(fmt(value(f)) for f in rounds(prefix))


def mean(xs):
    xs = [x for x in xs if x]
    return sum(xs) / len(xs) if xs else None


def accepted(w):
    """Per-worker connections accepted during round 1's tutorial run: (deltas, worst deviation %)."""
    def read(when):
        try:
            with open(os.path.join(D, f"accepted.{w}.r1.{when}")) as f:
                return dict(kv.split("=") for kv in f.read().split())
        except OSError:
            return {}
    a, b = read("before"), read("after")
    deltas = [(int(b[p]) - int(a.get(p, 0))) % 2**32 for p in b]
    if not deltas or sum(deltas) == 0:
        return deltas, None
    m = sum(deltas) / len(deltas)
    return deltas, max(abs(d - m) for d in deltas) / m * 100


def fmt(x, pat="{:,.0f}"):
    return "–" if x is None else pat.format(x)


def ratio(a, b):
    return a / b if a and b else None


rows = []  # (row, value, reference, ratio, target, met)


def row(name, value, ref, r, target, ok):
    verdict = "–" if ok is None else ("met" if ok else "**missed**")
    rows.append((name, value, ref, r, target, verdict))


def main():
    params = open(os.path.join(D, "params")).read().strip() if os.path.exists(os.path.join(D, "params")) else ""
    ceil_t, n_t = best("floor.tutorial.")
    ceil_k, _ = best("floor.keepalive.")
    default_n = None
    try:
        default_n = len(json.load(open(os.path.join(D, "status.default.json")))["workers"])
    except (OSError, ValueError, KeyError):
        pass
    print(f"# bench/limits.sh ({params}); the hop's ceiling = nginx -> floor.c; each row and ceiling is its best run")
    print(f"#   ceiling, tutorial nginx: {fmt(ceil_t)} req/s (best of {n_t} runs: "
          + ", ".join(fmt(rps(f)) for f in rounds("floor.tutorial."))
          + f"); with upstream keepalive {fmt(ceil_k)} (best of before/after)")
    (pre_t, _), (pre_k, _) = best("floor2.tutorial."), best("floor2.keepalive.")
    if pre_t or pre_k:
        print(f"#   from 2 prefork floor.c processes: tutorial {fmt(pre_t)} ({fmt(ratio(pre_t, ceil_t), '{:.0%}')}),"
              f" keepalive {fmt(pre_k)} ({fmt(ratio(pre_k, ceil_k), '{:.0%}')}) of the ceiling")
    floors = {1: (ceil_t, ceil_k, "ceiling"), 2: (pre_t, pre_k, "2 prefork floor.c processes")}
    for w in ["1", "2", "default"]:
        label = f"{w} worker(s)" if w != "default" else f"default ({default_n} workers)"
        (t, _), k = best(f"notesd.{w}.tutorial."), rps(f"notesd.{w}.keepalive.txt")
        n = default_n if w == "default" else int(w)
        # The reference: what as many upstream processes leave here (1: the hop's ceiling).
        ref_t, ref_k, what = floors.get(n, (None, None, f"{n} processes (not measured)"))
        r = ratio(t, ref_t)
        row(f"GET /healthz, tutorial nginx, {label}, vs {what}", fmt(t), fmt(ref_t), fmt(r, "{:.0%}"),
            "–", None)
        r = ratio(k, ref_k)
        target = w == "default"
        row(f"GET /healthz, upstream keepalive, {label}, vs {what}", fmt(k), fmt(ref_k), fmt(r, "{:.0%}"),
            "≥ 90 %" if target else "–", None if (r is None or not target) else r >= 0.9)
        deltas, dev = accepted(w)
        if w != "1":
            row(f"accepted per worker, {label} (tutorial run)", " / ".join(map(str, deltas)), "mean",
                fmt(dev, "±{:.0f} %"), "within ±25 %", None if dev is None else dev <= 25)
    for route, nd, ax in [
        ("GET /healthz, tutorial nginx", "notesd.healthz.tutorial.", "axum.healthz.tutorial."),
        ("GET /healthz, upstream keepalive", "notesd.healthz.keepalive.", "axum.healthz.keepalive."),
        ("GET /api/notes (notesd: list cache on)", "notesd.list.keepalive.", "axum.list.keepalive."),
        ("POST /api/notes", "notesd.post.keepalive.", "axum.post.keepalive."),
    ]:
        (n, _), (a, _) = best(nd), best(ax)
        r = ratio(n, a)
        row(f"vs axum: {route}, defaults (rounds {runs(nd, rps)} vs {runs(ax, rps)})", fmt(n), fmt(a),
            fmt(r, "{:.2f}×"), "ahead of axum", None if r is None else r >= 1.0)
    for route, nd, pg in [("GET /api/notes, cache off", "notesd.list.tcp.", "pgbench.list."),
                          ("POST /api/notes", "notesd.post.tcp.", "pgbench.insert.")]:
        (n, _), p = best(nd), best_tps(pg)
        r = ratio(n, p)
        row(f"vs pgbench: {route} (wrk over TCP; rounds {runs(nd, rps)} vs {runs(pg, tps)})",
            fmt(n), fmt(p) + " tps", fmt(r, "{:.0%}"), "≥ 85 % of pgbench", None if r is None else r >= 0.85)
    bigs = [s for s in map(stats, rounds("notesd.post.big.")) if s]
    (small, _) = best("notesd.post.tcp.")
    if bigs:
        top = max(bigs, key=lambda s: s["rps"])
        r = ratio(top["rps"], small)
        errs = sum(errors(s) for s in bigs)
        p99 = " / ".join(f"{s['p99_ms']:.0f}" for s in bigs)
        row(f"POST /api/notes, 4,000 connections (TCP; rounds {runs('notesd.post.big.', rps)})",
            f"{top['rps']:,.0f} req/s, p99 {p99} ms, {errs} errors",
            fmt(small) + " at 64", fmt(r, "{:.0%}"),
            "0 errors, throughput flat (≥ 90 %)", errs == 0 and r is not None and r >= 0.9)
    print()
    print("| row | notesd | reference | ratio | target | |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


main()
