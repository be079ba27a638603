"""gunicorn settings of the reference app, as in the tutorial.

gthread workers with 2 threads each, 2 x cores + 1 workers, on a unix socket.
bench/peer/run_gunicorn.sh sets the PEER_* variables; the defaults here match it.
"""
import multiprocessing
import os

RUN = os.environ.get("PEER_RUN", "/tmp/notesd-peer")

bind = "unix:" + os.environ.get("PEER_SOCK", RUN + "/gunicorn.sock")
worker_class = "gthread"
threads = 2
workers = int(os.environ.get("PEER_WORKERS") or multiprocessing.cpu_count() * 2 + 1)
timeout = int(os.environ.get("PEER_TIMEOUT") or 60)
graceful_timeout = 30
keepalive = 5
pidfile = os.environ.get("PEER_PIDFILE", RUN + "/gunicorn.pid")
errorlog = os.environ.get("PEER_ERRORLOG", RUN + "/gunicorn.log")
loglevel = "info"
# no access log while measuring (notesd runs with access_log = false too);
# PEER_ACCESSLOG=/path or "-" turns it on
accesslog = os.environ.get("PEER_ACCESSLOG") or None
