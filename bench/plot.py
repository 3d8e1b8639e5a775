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

COLORS = {"taskstream": "#1f6feb", "nchan": "#d9480f", "bare": "#2f9e44"}
LABELS = {"bare": "bare tokio (limit)"}


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


def throughput_row(report):
    dps = report["delivery"]["deliveries_per_sec"]
    return [dps], f"{dps:>9.0f} deliveries/s"


def latency_row(report):
    ms = [report["delivery"]["e2e_us"][p] / 1000 for p in ("p50", "p90", "p99")]
    return ms, "p50 {:.2f} ms, p90 {:.2f} ms, p99 {:.2f} ms".format(*ms)


def write_series(tmp, kind, server, points, row):
    """One server's points as a gnuplot data file (`row(report)` gives the columns after the
    subscriber count, and the text to print); returns the file and the server's colour."""
    lines = []
    for n, report in points:
        columns, text = row(report)
        lines.append(" ".join(str(c) for c in [n, *columns]))
        flag = "" if clean(report) else "  (loss, duplicates or disorder)"
        print(f"{kind:<4} {server:>10} {n:>6} subscribers: {text}{flag}")
    dat = tmp / f"{kind}-{server}.dat"
    dat.write_text("\n".join(lines) + "\n")
    return dat, COLORS.get(server, "#555555")


def draw(out, plots, title, ylabel, settings):
    """Runs gnuplot on `plots` (a list of plot clauses); nothing to draw, nothing written."""
    if not plots:
        return
    script = f"""
set terminal pngcairo size 900,540 font "DejaVu Sans,11"
set output "{out}"
set title "{title}"
set xlabel "subscribers"
set ylabel "{ylabel}"
set logscale x
set grid xtics ytics mxtics mytics lc rgb "#dddddd"
set key top left box opaque
set format x "%.0f"
set xtics (100, 300, 1000, 3000, 10000)
set xrange [80:12500]
{settings}
plot {", ".join(plots)}
"""
    with tempfile.NamedTemporaryFile("w", suffix=".gp", delete=False) as f:
        f.write(script)
    subprocess.run(["gnuplot", f.name], check=True)
    print(f"wrote {out}")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    if not shutil.which("gnuplot"):
        sys.exit("missing: gnuplot (apt-get install -y gnuplot-nox)")
    src, out_dir = sys.argv[1], pathlib.Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = load(src)
    tmp = pathlib.Path(tempfile.mkdtemp())

    plots = []
    for server, points in sorted(runs["tput"].items()):
        dat, color = write_series(tmp, "tput", server, points, throughput_row)
        plots.append(
            f'"{dat}" using 1:2 with linespoints lw 2 pt 7 lc rgb "{color}" title "{LABELS.get(server, server)}"'
        )
    draw(out_dir / "throughput.png", plots,
         "Deliveries per second, events published as fast as the server accepts",
         "deliveries/s", 'set format y "%.1s%c"\nset yrange [0:*]')

    plots = []
    for server, points in sorted(runs["lat"].items()):
        dat, color = write_series(tmp, "lat", server, points, latency_row)
        for col, pct, dash in ((2, "p50", 1), (3, "p90", 2), (4, "p99", 3)):
            plots.append(
                f'"{dat}" using 1:{col} with linespoints lw 2 dt {dash} pt 7 '
                f'lc rgb "{color}" title "{LABELS.get(server, server)} {pct}"'
            )
    draw(out_dir / "latency.png", plots,
         "End-to-end latency at 20 events/s (publish to read by the client)",
         "milliseconds (log scale)", "set logscale y")


if __name__ == "__main__":
    main()
