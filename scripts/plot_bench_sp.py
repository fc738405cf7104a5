#!/usr/bin/env python3
"""Plots `lasp bench sp` results: throughput and peak memory against sequence length per method.

usage: plot_bench_sp.py bench_sp.csv out.png
"""
import csv
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_bench_sp.py: matplotlib is not installed (apt-get install python3-matplotlib)")
    rows = list(csv.DictReader(open(sys.argv[1])))
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "lasp2", m))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: int(r["seq_len"]))
        x = [int(r["seq_len"]) for r in rs]
        a.plot(x, [float(r["tokens_per_s"]) for r in rs], marker="o", label=m)
        b.plot(x, [float(r["peak_mib"]) for r in rs], marker="o", label=m)
    world = rows[0]["world"] if rows else "?"
    for ax, title, unit in ((a, "throughput", "tokens/s"), (b, "peak memory per rank", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total sequence length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(f"{title}, W = {world}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)


if __name__ == "__main__":
    main()
