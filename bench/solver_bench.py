"""Solver time for growing problem sizes (splits x codecs x modes x tier assignments), on one core.

    python bench/solver_bench.py [--repeats N] [--out bench/results]

Prints a table and writes bench/results/solver_bench.csv and solver_bench.png. The exhaustive
reference (every candidate evaluated on its own) is timed where it finishes in reasonable time, to show
what the vectorised solver saves. Target (issue 4): under 10 ms for 50 splits x 3 tiers x 5 codecs x
2 modes.
"""

from __future__ import annotations

import os

# One core: no threaded BLAS behind numpy.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse
import copy
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiflow.api.spec import parse_flow
from aiflow.planner.cluster import LinkState, TierState, cluster_state
from aiflow.planner.problem import Problem, search_space
from aiflow.planner.profile import DEFAULT_PROFILE_PATH, profile_from_dict
from aiflow.planner.solver import plan, plan_exhaustive
from bench.report import write_csv  # noqa: E402

# Chains that end in caption_decoder, which may decode greedily or speculate: two modes.
CHAINS = {
    3: ("vision_head", "vision_tail", "caption_decoder"),
    4: ("vision_head", "vision_tail", "vision_tail", "caption_decoder"),
}
# (splits, codecs, stages); every stage auto, every tier up: tier assignments = 3 ** stages.
SIZES = [(7, 5, 3), (13, 5, 3), (25, 5, 3), (50, 5, 3), (50, 5, 4), (100, 10, 3), (200, 20, 3), (100, 10, 4)]
EXHAUSTIVE_LIMIT = 7_000  # candidates; beyond this the reference takes too long to be worth timing


def codec_specs(count: int) -> list[str]:
    specs = ["fp16", "int8", "int8+zstd", "fp16+zstd", "fp32+zstd"]
    for keep in range(4, 400, 4):
        specs += [f"topk:{keep}+int8+zstd", f"merge:{keep}+fp16+zstd"]
    return specs[:count]


def problem_of(splits: int, codecs: int, stages: int) -> Problem:
    doc = copy.deepcopy(yaml.safe_load(DEFAULT_PROFILE_PATH.read_text()))
    layers = splits - 1
    specs = codec_specs(codecs)
    doc["encoder"]["layerMs"] = [0.3 + 0.01 * (i % 7) for i in range(layers)]
    doc["features"] = {"codecs": specs, "codecMs": {s: {"encode": 0.1 * (i + 1), "decode": 0.05} for i, s in enumerate(specs)}}
    doc["quality"] = {"large": {"fp32": 97.0, **{s: [90.0 + 6.5 * l / layers for l in range(layers + 1)] for s in specs}}}
    profile = profile_from_dict(doc, where="bench")
    flow = parse_flow({"apiVersion": "aiflow.io/v1alpha1", "kind": "AIFlow", "metadata": {"name": "bench"},
                       "spec": {"stages": [{"name": f"s{i}", "model": m} for i, m in enumerate(CHAINS[stages])]}})
    tiers = [TierState("device", 1, 1, 4.0, 0.1, 4096), TierState("edge", 2, 2, 1.0, 0.5, 16384), TierState("cloud", 4, 4, 0.5, 0.3, 65536)]
    links = [LinkState("device", "edge", 2.0, 20.0), LinkState("edge", "cloud", 200.0, 30.0)]
    return Problem(flow, cluster_state(tiers, observed_links=links), profile, min_quality=0.0)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median and fastest wall time of `fn()` in ms (the fastest shows the cost without other load)."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    rows = []
    for splits, codecs, stages in SIZES:
        problem = problem_of(splits, codecs, stages)
        space = search_space(problem)
        candidates = len(space.modes) * len(space.splits) * len(space.codecs) * math.prod(map(len, space.stage_tiers))
        assert candidates == splits * codecs * 2 * 3**stages, "the space is the size the row says"
        solver_ms, solver_min = timed(lambda: plan(problem), args.repeats)
        exhaustive_ms = None
        if candidates <= EXHAUSTIVE_LIMIT:
            exhaustive_ms, _ = timed(lambda: plan_exhaustive(problem), 1)
            assert plan_exhaustive(problem).candidate == plan(problem).candidate
        rows.append({"splits": splits, "tiers": 3, "codecs": codecs, "modes": 2, "stages": stages, "candidates": candidates,
                     "solver_ms": round(solver_ms, 3), "solver_min_ms": round(solver_min, 3), "exhaustive_ms": None if exhaustive_ms is None else round(exhaustive_ms, 1)})

    header = f"{'splits':>6} {'tiers':>5} {'codecs':>6} {'modes':>5} {'stages':>6} {'candidates':>10} {'solver ms':>10} {'fastest ms':>10} {'exhaustive ms':>14}"
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"solver time, median of {args.repeats}, one core ({platform.machine()}, Python {platform.python_version()}{load})")
    print(header)
    for r in rows:
        ex = "-" if r["exhaustive_ms"] is None else f"{r['exhaustive_ms']:.1f}"
        print(f"{r['splits']:>6} {r['tiers']:>5} {r['codecs']:>6} {r['modes']:>5} {r['stages']:>6} {r['candidates']:>10} {r['solver_ms']:>10.2f} {r['solver_min_ms']:>10.2f} {ex:>14}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "solver_bench.csv", rows)
    plot(rows, out / "solver_bench.png")
    print(f"wrote {out / 'solver_bench.csv'} and {out / 'solver_bench.png'}")
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["candidates"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["candidates"] for r in rows]
    ax.loglog(xs, [r["solver_ms"] for r in rows], "o-", label="plan (vectorised)")
    ex = [(r["candidates"], r["exhaustive_ms"]) for r in rows if r["exhaustive_ms"] is not None]
    ax.loglog([x for x, _ in ex], [y for _, y in ex], "s--", label="plan_exhaustive (reference)")
    ax.axhline(10, color="grey", linestyle=":", label="10 ms target")
    target = next(r for r in rows if (r["splits"], r["codecs"], r["stages"]) == (50, 5, 3))
    ax.annotate("50 splits x 3 tiers\nx 5 codecs x 2 modes", (target["candidates"], target["solver_ms"]),
                textcoords="offset points", xytext=(10, -30), fontsize=8)
    ax.set_xlabel("candidates (splits x codecs x modes x tier assignments)")
    ax.set_ylabel("solver time, ms (median, one core)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
