"""The link probe on emulated links: measured vs shaped bandwidth, and the bytes each measurement cost.

    python bench/linkprobe_bench.py [--repeats 3] [--out bench/results]

Runs `aiflow.linkprobe.measure_peer` (the chart's defaults: 60 s interval, 2 % budget) through
`aiflow.local.links` at 0.1 to 1000 Mbit/s and two RTTs; prints a table and writes
linkprobe_bench.csv. `share_pct` is the measurement's bytes over what the link carries in one interval.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiflow import linkprobe  # noqa: E402
from bench.report import write_csv  # noqa: E402
from tests.unit.linkprobe_peers import peer_behind_link  # noqa: E402

RATES_MBIT = (0.1, 1, 10, 100, 1000)
LATENCIES = ("5ms", "40ms")
INTERVAL_S = 60.0


async def run(repeats: int) -> list[dict]:
    budget = linkprobe.Budget.of(INTERVAL_S)
    rows = []
    if True:  # the peer and the link run in processes of their own, as on separate machines
        for latency in LATENCIES:
            for mbit in RATES_MBIT:
                with peer_behind_link(f"{mbit}mbit", latency) as port:
                    samples = [await linkprobe.measure_peer("127.0.0.1", port, budget=budget)
                               for _ in range(repeats)]
                errors = [100 * (s.bandwidth_bps / (mbit * 1e6) - 1) for s in samples]
                sent = max(s.bytes_sent for s in samples)
                rows.append({
                    "bandwidth_mbit": mbit, "one_way_latency": latency,
                    "measured_mbit": statistics.median(s.bandwidth_bps for s in samples) / 1e6,
                    "worst_error_pct": max(errors, key=abs), "rtt_ms": statistics.median(s.rtt_s for s in samples) * 1e3,
                    "bytes_per_round": sent, "share_pct": 100 * sent * 8 / (mbit * 1e6 * INTERVAL_S),
                    "budget_pct": 100 * budget.seconds / INTERVAL_S,
                })
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shaped':>10} {'latency':>8} {'measured':>10} {'worst err%':>10} {'bytes':>10} {'share%':>7}")
    for r in rows:
        print(f"{r['bandwidth_mbit']:>8g}M {r['one_way_latency']:>8} {r['measured_mbit']:>9.4g}M "
              f"{r['worst_error_pct']:>+10.2f} {r['bytes_per_round']:>10} {r['share_pct']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="measurements per link setting")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = asyncio.run(run(args.repeats))
    print_table(rows)
    path = write_csv(args.out / "linkprobe_bench.csv", rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
