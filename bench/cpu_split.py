#!/usr/bin/env python3
"""CPU per request, split by process, for one wrk run.

    bench/cpu_split.py SECONDS URL        (env C=64 connections, T=2 wrk threads)

Runs wrk, and from /proc (utime+stime of every process, before and after; wrk's own
from its rusage) prints req/s and, per process group (nginx, notesd, postgres, wrk,
other: by command name), microseconds of CPU per request and % of one core.
This is how bench/README.md splits the proxy hop's cost ("Why /healthz cannot reach
50 %"): e.g. against nginx static, nginx -> notesd and nginx -> floor.c
(floor.c's process falls under "other").
"""
import os
import re
import subprocess
import sys

HZ = os.sysconf("SC_CLK_TCK")


def cpu_by_pid():
    d = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        f = s[s.rindex(")") + 2:].split()
        d[int(p)] = (comm, int(f[11]) + int(f[12]))
    return d


def group(comm):
    for g in ("nginx", "notesd", "postgres", "wrk"):
        if comm.startswith(g):
            return g
    return "other"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    dur, url = sys.argv[1], sys.argv[2]
    before = cpu_by_pid()
    wrk = subprocess.Popen(["wrk", f"-t{os.environ.get('T', '2')}", f"-c{os.environ.get('C', '64')}",
                            f"-d{dur}s", url], stdout=subprocess.PIPE, text=True)
    out = wrk.stdout.read()
    _, _, usage = os.wait4(wrk.pid, 0)
    after = cpu_by_pid()
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        sys.exit(f"no Requests/sec in wrk's output:\n{out}")
    rps = float(m.group(1))
    requests = rps * float(dur)
    ticks = {"wrk": (usage.ru_utime + usage.ru_stime) * HZ}
    for pid, (comm, t) in after.items():
        dt = t - before[pid][1] if pid in before else t
        if dt > 0 and pid != wrk.pid:
            ticks[group(comm)] = ticks.get(group(comm), 0) + dt
    parts = [f"{g}={ticks[g] / HZ * 1e6 / requests:.1f}us({ticks[g] / HZ / float(dur) * 100:.0f}%)"
             for g in sorted(ticks)]
    print(f"{url} rps={rps:.0f} " + " ".join(parts))


if __name__ == "__main__":
    main()
