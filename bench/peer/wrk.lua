-- wrk script of the bench (lib.sh:run_wrk). WRK_POST=1: every request is
-- POST /api/notes with the same small JSON note; otherwise the URL is fetched with GET.
-- At the end, one machine-readable line (read by bench.sh, bench/run.sh, bench/report.py):
--   PEERSTATS requests= duration_s= rps= p50_ms= p90_ms= p99_ms= max_ms= non2xx= connect= read= write= timeout=
-- non2xx is wrk's count of answers with status > 399; connect/read/write/timeout are socket errors.
if os.getenv("WRK_POST") == "1" then
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"title":"bench note","body":"posted by wrk"}'
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local err = summary.errors
  local function ms(us) return us / 1000 end
  io.write(string.format(
    "PEERSTATS requests=%d duration_s=%.2f rps=%.1f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f "
      .. "non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, secs, summary.requests / secs,
    ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)), ms(latency.max),
    err.status, err.connect, err.read, err.write, err.timeout))
end
