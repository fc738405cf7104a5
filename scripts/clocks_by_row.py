#!/usr/bin/env python3
"""Mean SM clock and power over each row of a `lasp bench lowp` log.

usage: scripts/clocks_by_row.py bench_lowp.log clocks_lowp.csv

device_check.sh samples nvidia-smi every 100 ms while the bench runs (clocks_lowp.csv); the
bench's rows end with their UTC end time (HH:MM:SS.mmm), and a row's window runs from the
previous row's end to its own. Rows of the sustained table carry their own windows
(start-end for bf16 | lt | ours), which are reported one by one. Samples with the power-cap
reason (bit 0x4 of clocks_event_reasons) are counted.
"""
import re
import sys


def seconds(hms):
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def load_clocks(path):
    samples = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6 or not parts[1].endswith("MHz"):
            continue
        t = seconds(parts[0].split(" ")[1])
        mhz = float(parts[1].split()[0])
        watts = float(parts[3].split()[0]) if parts[3].endswith("W") else float("nan")
        capped = int(parts[5], 16) & 0x4 != 0 if parts[5].startswith("0x") else False
        samples.append((t, mhz, watts, capped))
    return samples


def summary(samples, t0, t1):
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if not inside:
        return "no samples"
    n = len(inside)
    return "%4.0f MHz (min %4.0f), %3.0f W, %d/%d samples power-capped" % (
        sum(s[1] for s in inside) / n, min(s[1] for s in inside),
        sum(s[2] for s in inside) / n, sum(s[3] for s in inside), n)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    samples = load_clocks(sys.argv[2])
    stamp = re.compile(r"(\d\d:\d\d:\d\d\.\d\d\d)")
    window = re.compile(r"(\d\d:\d\d:\d\d\.\d\d\d)-(\d\d:\d\d:\d\d\.\d\d\d)")
    prev, last_label = None, ""
    for line in open(sys.argv[1]):
        line = line.rstrip("\n")
        spans = window.findall(line)
        if spans:  # sustained table: bf16 | lt | ours
            label = line[:45].rstrip()
            last_label = label
            for name, (a, b) in zip(("bf16", "lt", "ours"), spans):
                print("%-45s %-5s %s" % (label, name, summary(samples, seconds(a), seconds(b))))
            prev = seconds(spans[-1][1])
            continue
        found = stamp.findall(line)
        if not found:
            if line[:26].strip():
                last_label = line[:45].rstrip()
            prev = None if not line.strip() else prev
            continue
        end = seconds(found[-1])
        label = line[:45].rstrip()
        if not line[:26].strip():  # the kernel table's speedup line: its shape is the line above
            label = last_label
        last_label = label
        if prev is not None:
            print("%-45s       %s" % (label, summary(samples, prev, end)))
        prev = end


if __name__ == "__main__":
    main()
