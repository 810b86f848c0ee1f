"""The sweep's lowest-bandwidth grid points only (0.25 Mbit/s): every scheme, the default codec among the splits.

    python -m bench.sweep_lowest_bandwidth OUT [REQUESTS]      # e.g. docs/results/sweep_lowest_bandwidth 10

The same harness, settings and outputs as `python -m bench.sweep`, on the four 0.25 Mbit/s grid points.
"""
import sys
from pathlib import Path
from bench.sweep import Settings, run, write, print_summary, load_planner_profile, DEFAULT_PROFILE
if len(sys.argv) < 2:
    sys.exit(__doc__)
settings = Settings(bandwidths=(0.25,), requests=int(sys.argv[2]) if len(sys.argv) > 2 else 10)
profile, source = load_planner_profile(DEFAULT_PROFILE)
doc = run(settings, profile, source, "python -m bench.sweep_lowest_bandwidth " + " ".join(sys.argv[1:]), log=lambda l: print(l, flush=True))
write(doc, Path(sys.argv[1]))
print_summary(doc)
