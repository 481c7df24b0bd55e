#!/usr/bin/env python3
"""kernel_times.py — sums ncu's per-launch GPU time by kernel name.

Why: without Nsight Systems on the GPU machine, `ncu --metrics gpu__time_duration.sum --csv`
over a few decode steps is the way to see where a step's GPU time goes (each launch timed
alone, clocks left alone). Usage: ncu ... --csv > raw.csv; kernel_times.py raw.csv [STEPS]
prints one row per kernel: launches per step, us per step, share. --grid: one row per kernel
and grid size (tells the matrices of one GEMV kernel apart).
"""
import csv
import sys
from collections import defaultdict

args = [a for a in sys.argv[1:] if a != "--grid"]
by_grid = "--grid" in sys.argv
rows = list(csv.reader(l for l in open(args[0]) if l.startswith('"')))
steps = float(args[1]) if len(args) > 1 else 1.0
hdr = rows[0]
ki, mi, vi, ui, gi = (hdr.index(h) for h in ("Kernel Name", "Metric Name", "Metric Value",
                                             "Metric Unit", "Grid Size"))
t = defaultdict(float)
n = defaultdict(int)
for r in rows[1:]:
    if r[mi] != "gpu__time_duration.sum":
        continue
    v = float(r[vi].replace(",", ""))
    unit = r[ui].lower()
    v = v / 1000.0 if unit in ("ns", "nsecond") else v * 1000.0 if unit in ("ms", "msecond") else v
    name = r[ki].split("(")[0][:44] + ((" " + r[gi]) if by_grid else "")
    t[name] += v
    n[name] += 1
tot = sum(t.values())
print(f"{'kernel':60s} {'calls/step':>10s} {'us/step':>10s} {'share':>7s}")
for k in sorted(t, key=t.get, reverse=True):
    print(f"{k:60s} {n[k]/steps:10.1f} {t[k]/steps:10.1f} {100*t[k]/tot:6.1f}%")
print(f"{'total':60s} {sum(n.values())/steps:10.1f} {tot/steps:10.1f}")
