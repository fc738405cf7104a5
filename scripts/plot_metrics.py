#!/usr/bin/env python3
"""Draw loss curves from one or more lasp metrics.jsonl files into a PNG.

    scripts/plot_metrics.py runs/tiny/metrics.jsonl runs/tiny-sp4/metrics.jsonl -o loss.png
    scripts/plot_metrics.py runs/*/metrics.jsonl --keys train/loss val/loss --log-y

Each metrics.jsonl line is one JSON object: {"step": N, "time": T, "<key>": value, ...}
(non-finite values are written as null). Lines with the same step are merged (train and val
metrics may be logged separately); when a resumed run logs a step again, its values win. The label of a curve is the run directory's name.
"""
import argparse
import json
import os
import sys


def read_metrics(path):
    """Returns {key: [(step, value), ...]} sorted by step, later values replacing earlier ones."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                # A run killed mid-write can leave a partial last line: skip it, say so.
                print(f"{path}:{lineno}: skipping a line that is not JSON ({e.msg})", file=sys.stderr)
                continue
            if not isinstance(record, dict) or "step" not in record:
                print(f"{path}:{lineno}: skipping a record without \"step\"", file=sys.stderr)
                continue
            # Merge: a step may be logged in several calls (train, then val); a resumed run
            # re-logging a step overrides the older values key by key.
            by_step.setdefault(int(record["step"]), {}).update(record)
    series = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key in ("step", "time") or not isinstance(value, (int, float)):
                continue
            series.setdefault(key, []).append((step, float(value)))
    return series


def default_keys(all_series):
    keys = sorted({k for s in all_series for k in s if "loss" in k})
    return keys or sorted({k for s in all_series for k in s})[:4]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="metrics.jsonl files")
    parser.add_argument("-o", "--output", default="loss.png", help="output PNG (default: loss.png)")
    parser.add_argument("--keys", nargs="+", help="metric keys to plot (default: every key containing 'loss')")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args()

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit(
            "plot_metrics.py needs matplotlib, which is not installed.\n"
            "Install it with `apt-get install -y python3-matplotlib` or `pip install matplotlib`."
        )

    runs = []
    for path in args.files:
        if not os.path.isfile(path):
            sys.exit(f"plot_metrics.py: {path}: no such file")
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        runs.append((label, read_metrics(path)))
    keys = args.keys or default_keys([s for _, s in runs])
    if not keys:
        sys.exit("plot_metrics.py: the files hold no metrics")

    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    plotted = 0
    for ax, key in zip(axes[0], keys):
        for label, series in runs:
            points = series.get(key)
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, linewidth=1.4, marker="." if len(points) < 40 else None)
            plotted += 1
        ax.set_title(key)
        ax.set_xlabel("step")
        if args.log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(runs) > 1 or plotted:
            ax.legend(fontsize=8)
    if plotted == 0:
        sys.exit(f"plot_metrics.py: none of the keys {keys} occur in the files")
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output} ({', '.join(keys)}; {len(runs)} run(s))")


if __name__ == "__main__":
    main()
