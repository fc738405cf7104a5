#!/usr/bin/env python3
"""Turns results/lasp2.csv (scripts/reproduce_lasp2.sh) into markdown tables and plots.

usage: lasp2_tables.py lasp2.csv OUT_DIR
"""
import csv
import os
import sys


def fmt_len(n):
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = list(csv.DictReader(open(sys.argv[1])))
    out = sys.argv[2]
    lines = ["# LASP-2 vs LASP-1 vs Ring Attention", "",
             "Produced by `scripts/reproduce_lasp2.sh`; every cell is the median step of a short run "
             "(bf16, block recomputation). Empty: did not fit or failed.", ""]
    for model in sorted({r["model"] for r in rows}):
        mr = [r for r in rows if r["model"] == model]
        world = mr[0]["world"]
        lengths = sorted({int(r["seq_len"]) for r in mr})
        methods = sorted({r["method"] for r in mr}, key=lambda m: (m != "lasp2", m))
        cell = {(r["method"], int(r["seq_len"])): r for r in mr}
        for title, key, f in (("tokens/s", "tokens_per_s", lambda v: f"{float(v):,.0f}"),
                              ("step time (ms)", "step_ms", lambda v: f"{float(v):,.1f}"),
                              ("peak memory per GPU (GiB)", "peak_mib", lambda v: f"{float(v) / 1024:.1f}")):
            lines.append(f"## {model} 1B, {world} GPU(s): {title}")
            lines.append("")
            lines.append("| method | " + " | ".join(fmt_len(n) for n in lengths) + " |")
            lines.append("|---" * (len(lengths) + 1) + "|")
            for m in methods:
                vals = []
                for n in lengths:
                    r = cell.get((m, n))
                    vals.append(f(r[key]) if r and r[key] else "")
                lines.append(f"| {m} | " + " | ".join(vals) + " |")
            lines.append("")
        base = {n: float(cell[("lasp2", n)]["tokens_per_s"]) for n in lengths
                if ("lasp2", n) in cell and cell[("lasp2", n)]["tokens_per_s"]}
        lines.append(f"LASP-2 speed-up over each method ({model}):")
        lines.append("")
        lines.append("| method | " + " | ".join(fmt_len(n) for n in lengths) + " |")
        lines.append("|---" * (len(lengths) + 1) + "|")
        for m in methods:
            if m == "lasp2":
                continue
            vals = []
            for n in lengths:
                r = cell.get((m, n))
                vals.append(f"{base[n] / float(r['tokens_per_s']):.2f}x" if r and r["tokens_per_s"] and n in base else "")
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines.append("")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            for key, name, unit, scale in (("tokens_per_s", "throughput", "tokens/s", 1),
                                           ("peak_mib", "memory", "peak GiB per GPU", 1 / 1024)):
                plt.figure(figsize=(6, 4))
                for m in methods:
                    xs = [n for n in lengths if (m, n) in cell and cell[(m, n)][key]]
                    plt.plot(xs, [float(cell[(m, n)][key]) * scale for n in xs], marker="o", label=m)
                plt.xscale("log", base=2)
                plt.xlabel("total sequence length")
                plt.ylabel(unit)
                plt.title(f"{model} 1B, {world} GPU(s)")
                plt.grid(alpha=0.3)
                plt.legend()
                plt.tight_layout()
                plt.savefig(os.path.join(out, f"{name}_{model}.png"), dpi=120)
                plt.close()
        except ImportError:
            lines.append("(no plots: matplotlib is not installed)")
    open(os.path.join(out, "lasp2_tables.md"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
