"""Schemes x device uplinks on real Triton servers: median latency, bytes upstream, caption quality.

    python bench/flow_bench.py [--count 8] [--uplinks 0.5,2,10,50] [--out bench/results]

Starts one tritonserver per tier (the local runtime), changes the device->edge uplink live between
rounds, runs every scheme of the demo on the same held-out images, prints a table and writes
flow_bench.csv and flow_bench.png (latency against uplink, one line per scheme).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiflow.local.compare import demo_schemes, format_table, heldout_images, run_scheme
from aiflow.local.schemes import Conditions, start_runtime
from bench.report import write_csv  # noqa: E402


def run(count: int, uplinks: list[float], seed: int, conditions: Conditions, split_layer=None, codec=None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="aiflow-bench-") as tmp:
        images, refs = heldout_images(seed, count, Path(tmp) / "images")
        runtime, flow = start_runtime(conditions, state_path=Path(tmp) / "state")
        try:
            for mbit in uplinks:
                runtime.link("device->edge").set(bandwidth_up=mbit * 1e6)
                runs = [run_scheme(flow, s, images, refs) for s in demo_schemes(split_layer, codec)]
                print(f"\ndevice->edge uplink {mbit:g} Mbit/s, rtt {conditions.rtt_ms:g} ms, device x{conditions.device_factor:g}")
                print("\n".join(format_table(runs)), flush=True)
                rows += [{"uplink_mbit": mbit, **{k: v for k, v in r.as_dict().items() if k != "wire_bytes_up"},
                          "wire_bytes_from_device": r.wire_bytes_from_device} for r in runs]
        finally:
            runtime.stop()
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "flow_bench.csv", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        mine = [r for r in rows if r["scheme"] == scheme]
        ax1.plot([r["uplink_mbit"] for r in mine], [r["median_latency_ms"] for r in mine], marker="o", label=scheme)
    ax1.set_xscale("log")
    ax1.set_xlabel("device->edge uplink (Mbit/s)")
    ax1.set_ylabel("median latency per image (ms)")
    ax1.legend(fontsize=8)
    last = [r for r in rows if r["uplink_mbit"] == rows[-1]["uplink_mbit"]]
    ax2.barh([r["scheme"] for r in last], [r["bytes_from_device"] for r in last])
    ax2.set_xlabel("payload bytes up from the device per image")
    fig.tight_layout()
    fig.savefig(out / "flow_bench.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2027)
    parser.add_argument("--uplinks", default="0.5,2,10,50", help="device->edge uplink rates, Mbit/s")
    parser.add_argument("--device-factor", type=float, default=Conditions.device_factor)
    parser.add_argument("--rtt-ms", type=float, default=Conditions.rtt_ms)
    parser.add_argument("--split-layer", type=int, default=None)
    parser.add_argument("--codec", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    conditions = dataclasses.replace(Conditions(), device_factor=args.device_factor, rtt_ms=args.rtt_ms)
    rows = run(args.count, [float(x) for x in args.uplinks.split(",")], args.seed, conditions, args.split_layer, args.codec)
    write(rows, Path(args.out))
    print(f"\nwrote {args.out}/flow_bench.csv and flow_bench.png")


if __name__ == "__main__":
    main()
