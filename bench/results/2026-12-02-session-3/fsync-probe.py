"""Write + fdatasync latency on the disk the database lives on (docs/performance.md, fourth round).

    python3 fsync-probe.py [DIR]   # DIR: a directory on that disk (default: the current one)
"""
import os, statistics, sys, time

path = os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".", "fsync-probe.tmp")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
try:
    for size in (4096, 16384, 40960):
        buf = b"x" * size
        lat = []
        off = 0
        # Overwrites within 4 MiB, as a WAL that was reset after a checkpoint is overwritten.
        for _ in range(2000):
            os.pwrite(fd, buf, off)
            off = (off + size) % (4 << 20)
            t = time.perf_counter()
            os.fdatasync(fd)
            lat.append((time.perf_counter() - t) * 1e3)
        lat.sort()
        print(f"{size:6d} B write + fdatasync: p50 {lat[1000]:.3f} ms  p90 {lat[1800]:.3f}  "
              f"p99 {lat[1980]:.3f}  mean {statistics.mean(lat):.3f}")
finally:
    os.close(fd)
    os.unlink(path)
