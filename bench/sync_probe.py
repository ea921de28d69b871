"""How long it takes to make many files' small appends durable: one fdatasync per file in turn,
fdatasync from 16 threads, or one syncfs for the whole filesystem (the design question of a
node-wide log syncer, issue 8 scope 4). Usage: python3 bench/sync_probe.py [FILES] [DIR].
Prints the median of 5 rounds: wall time and this process's CPU time.
"""
import ctypes, os, sys, time, tempfile, concurrent.futures as cf, resource
libc = ctypes.CDLL("libc.so.6", use_errno=True)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
d = tempfile.mkdtemp(dir=sys.argv[2] if len(sys.argv) > 2 else "/tmp")
fds = [os.open(f"{d}/f{i}", os.O_RDWR | os.O_CREAT) for i in range(N)]
buf = os.urandom(256)
def dirty():
    for fd in fds: os.write(fd, buf)
def cpu(): r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
def run(name, f):
    res = []
    for _ in range(5):
        dirty(); c0, t0 = cpu(), time.perf_counter(); f(); res.append((time.perf_counter() - t0, cpu() - c0))
    res.sort()
    w, c = res[2]
    print(f"{name:28s} N={N} wall {w*1000:8.1f} ms  cpu {c*1000:8.1f} ms  per file {w/N*1e6:7.1f} us")
run("fdatasync serial", lambda: [os.fdatasync(fd) for fd in fds])
with cf.ThreadPoolExecutor(16) as ex:
    run("fdatasync 16 threads", lambda: list(ex.map(os.fdatasync, fds)))
run("syncfs once", lambda: libc.syncfs(fds[0]))
for fd in fds: os.close(fd)
import shutil; shutil.rmtree(d)
