#!/usr/bin/env python3
"""Draw the subscriber-count sweep of bench/compare.sh --sweep as two PNGs.

    bench/plot.py DIR OUTDIR     # DIR holds SERVER-tput-N.json and SERVER-lat-N.json

Writes OUTDIR/throughput.png (deliveries/s against subscribers) and
OUTDIR/latency.png (end-to-end p50/p90/p99 against subscribers, at 20 events/s),
one line per server, with gnuplot (Debian's gnuplot-nox). Only the standard
library is used, so no virtualenv is needed; prints the numbers it plotted.
"""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

COLORS = {"taskstream": "#1f6feb", "nchan": "#d9480f"}


def load(directory):
    """{kind: {server: [(subscribers, report), ...]}} sorted by subscribers."""
    runs = {"tput": {}, "lat": {}}
    for path in sorted(pathlib.Path(directory).glob("*-*-*.json")):
        m = re.fullmatch(r"(.+)-(tput|lat)-(\d+)\.json", path.name)
        if not m:
            continue
        server, kind, n = m.group(1), m.group(2), int(m.group(3))
        report = json.loads(path.read_text())
        runs[kind].setdefault(server, []).append((n, report))
    for kind in runs.values():
        for points in kind.values():
            points.sort(key=lambda p: p[0])
    return runs


def clean(report):
    d = report["delivery"]
    return d["lost"] == 0 and d["duplicated"] == 0 and d["out_of_order"] == 0


def plot(script, out):
    with tempfile.NamedTemporaryFile("w", suffix=".gp", delete=False) as f:
        f.write(script)
    subprocess.run(["gnuplot", f.name], check=True)
    print(f"wrote {out}")


def header(out, title, ylabel, log_y):
    return f"""
set terminal pngcairo size 900,540 font "DejaVu Sans,11"
set output "{out}"
set title "{title}"
set xlabel "subscribers"
set ylabel "{ylabel}"
set logscale x
{"set logscale y" if log_y else ""}
set grid xtics ytics mxtics mytics lc rgb "#dddddd"
set key top left box opaque
set format x "%.0f"
set xtics (100, 300, 1000, 3000, 10000)
set xrange [80:12500]
"""


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    if not shutil.which("gnuplot"):
        sys.exit("missing: gnuplot (apt-get install -y gnuplot-nox)")
    src, out_dir = sys.argv[1], pathlib.Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = load(src)
    tmp = pathlib.Path(tempfile.mkdtemp())

    # Throughput.
    plots = []
    for server, points in sorted(runs["tput"].items()):
        dat = tmp / f"tput-{server}.dat"
        lines = []
        for n, r in points:
            dps = r["delivery"]["deliveries_per_sec"]
            lines.append(f"{n} {dps}")
            flag = "" if clean(r) else "  (loss, duplicates or disorder)"
            print(f"tput {server:>10} {n:>6} subscribers: {dps:>9.0f} deliveries/s{flag}")
        dat.write_text("\n".join(lines) + "\n")
        color = COLORS.get(server, "#555555")
        plots.append(
            f'"{dat}" using 1:2 with linespoints lw 2 pt 7 lc rgb "{color}" title "{server}"'
        )
    if plots:
        out = out_dir / "throughput.png"
        plot(
            header(out, "Deliveries per second, events published as fast as the server accepts",
                   "deliveries/s", False)
            + 'set format y "%.0s%c"\nset yrange [0:*]\nplot ' + ", ".join(plots) + "\n",
            out,
        )

    # Latency percentiles.
    plots = []
    for server, points in sorted(runs["lat"].items()):
        dat = tmp / f"lat-{server}.dat"
        lines = []
        for n, r in points:
            e = r["delivery"]["e2e_us"]
            lines.append(f"{n} {e['p50'] / 1000} {e['p90'] / 1000} {e['p99'] / 1000}")
            print(f"lat  {server:>10} {n:>6} subscribers: p50 {e['p50'] / 1000:.2f} ms, "
                  f"p90 {e['p90'] / 1000:.2f} ms, p99 {e['p99'] / 1000:.2f} ms")
        dat.write_text("\n".join(lines) + "\n")
        color = COLORS.get(server, "#555555")
        for col, pct, dash in ((2, "p50", 1), (3, "p90", 2), (4, "p99", 3)):
            plots.append(
                f'"{dat}" using 1:{col} with linespoints lw 2 dt {dash} pt 7 '
                f'lc rgb "{color}" title "{server} {pct}"'
            )
    if plots:
        out = out_dir / "latency.png"
        plot(
            header(out, "End-to-end latency at 20 events/s (publish to read by the client)",
                   "milliseconds (log scale)", True)
            + "plot " + ", ".join(plots) + "\n",
            out,
        )


if __name__ == "__main__":
    main()
