"""Capacity: N cameras at once through one edge and one cloud, serial against concurrent serving.

    nice -n 10 python bench/capacity.py [--cameras 1,2,4,8,16,32] [--window 8] [--scheme split-spec]

The local runtime as `aiflow up` starts it (one tritonserver per tier, emulated links and compute
factors at their defaults). Every camera has its own device stage, as a device serves one camera in
real life: the camera runs the scheme's device model in its own thread (the same `aiflow.stage`
logic, real compute on this machine's cores plus the device's emulated slowdown; 32 Triton
instances would load for minutes here), and sends its output through the device->edge link to the
shared edge over its own gRPC channel. All cameras share the edge and the cloud. Each camera is a
closed loop: one PNG, wait for the caption, the next PNG.

Two configurations are measured in the same run, on the same machine:
- `serial`: what a flow had before: one instance per stage, no batching, no queue bound, and a
  stage that waits for the next one inside `execute`;
- `concurrent`: the defaults now: stages free while the next tier works, dynamic batching
  (no added delay), a queue bound of 64 per stage.

Per N: requests per second, latency p50/p95/p99 at the camera, failed requests (with the first
error), and per tier its utilisation (busy time of its instances over the window, from Triton's
compute metric), mean queue time and mean batch; plus the machine's CPU use. Writes
capacity.csv, capacity.md and capacity.png under --out (default docs/results).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_csv

from aiflow.controller.stage_metrics import StageSample, parse_triton_metrics
from aiflow.local.schemes import Conditions, get_scheme, start_runtime, wiring
from aiflow.serving import SERIAL, Serving

CONFIGS = {"serial": SERIAL, "concurrent": Serving()}


def images(count: int = 16, seed: int = 7) -> list[bytes]:
    from PIL import Image

    from aiflow.model import scenes

    arrays, _ = scenes.make_batch(seed=seed, start=0, count=count, split="heldout")
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def scheme_wires(scheme, config: str):
    """The scheme's loads on the shared tiers, with `config`'s serving settings."""
    knobs = CONFIGS[config].knobs()
    return [replace(w, parameters={**w.parameters, **knobs}) for w in wiring(scheme) if w.tier != "device"]


def device_stage(flow, scheme, family, timeout_s: float):
    """A camera's own device stage: the scheme's first model, configured as the runtime would load
    it on the device, forwarding to the edge through the device->edge link."""
    from aiflow.local.tritonserver import model_config_json
    from aiflow.stage.config import stage_config
    from aiflow.stage.logic import Stage
    from aiflow.stage.triton import model_parameters

    (w,) = [w for w in wiring(scheme) if w.tier == "device"]
    params = {**flow.wanted_parameters(w), "AIFLOW_COMPUTE_FACTOR": f"{flow.state['tiers']['device']['compute_factor']:g}",
              "AIFLOW_TIMEOUT_S": f"{timeout_s:g}"}
    config = json.loads(model_config_json(Path(flow.state["model_repo"]) / w.model, params, name=w.model))
    return Stage(stage_config(w.model, model_parameters(config), {}), family)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def read_samples(flow, scheme) -> dict[str, StageSample]:
    out = {}
    for p in scheme.chain[1:]:
        with urllib.request.urlopen(flow.state["tiers"][p.tier]["metrics"], timeout=5) as r:  # noqa: S310 (loopback)
            out[p.tier] = parse_triton_metrics(r.read().decode(), p.model)
    return out


def camera_loop(stage, blobs: list[bytes], offset: int, stop_at: float, window: tuple[float, float], out: list):
    """One camera: its device stage computes, forwards to the edge and waits for the caption."""
    import numpy as np

    from aiflow.stage.config import StageError

    i = offset
    try:
        while time.monotonic() < stop_at:
            start = time.monotonic()
            device_ms = 0.0
            try:
                reply = stage.run({"IMAGE": np.array([blobs[i % len(blobs)]], dtype=object)})
                hop = json.loads(bytes(reply["TRACE"][0]))[0]
                device_ms, error = hop["compute_ms"] + hop["emulated_ms"], ""
            except StageError as exc:
                error = str(exc)
            end = time.monotonic()
            if window[0] <= start and end <= window[1]:
                out.append((1000 * (end - start), error, device_ms))
            if error:
                time.sleep(0.05)  # a camera backs off a little after an error
            i += 1
    finally:
        stage.close()


def measure(flow, scheme, family, config: str, cameras: int, blobs, warmup: float, window: float, timeout_s: float) -> dict:
    stages = [device_stage(flow, scheme, family, timeout_s) for _ in range(cameras)]
    now = time.monotonic()
    win = (now + warmup, now + warmup + window)
    results: list = []
    threads = [
        threading.Thread(target=camera_loop, args=(stages[k], blobs, k, win[1], win, results), daemon=True)
        for k in range(cameras)
    ]
    for t in threads:
        t.start()
    time.sleep(max(0.0, win[0] - time.monotonic()))
    before, cpu0 = read_samples(flow, scheme), cpu_times()
    time.sleep(max(0.0, win[1] - time.monotonic()))
    after, cpu1 = read_samples(flow, scheme), cpu_times()
    for t in threads:
        t.join(timeout=timeout_s + 5)
    ok = sorted(ms for ms, err, _ in results if not err)
    errors = [err for _, err, _ in results if err]
    row = {
        "config": config,
        "cameras": cameras,
        "throughput_rps": round(len(ok) / window, 2),
        "p50_ms": _pct(ok, 50),
        "p95_ms": _pct(ok, 95),
        "p99_ms": _pct(ok, 99),
        "ok": len(ok),
        "failed": len(errors),
        "overloaded": sum("overloaded" in e for e in errors),
        "cpu_percent": round(100 * (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1), 1),
    }
    serving = CONFIGS[config]
    device = scheme.chain[0].tier
    row[f"{device}_util"] = round(sum(d for _, _, d in results) / 1e3 / window / cameras, 3)
    row[f"{device}_queue_ms"], row[f"{device}_batch"] = 0.0, 1.0  # its own camera's only
    for p in scheme.chain[1:]:
        a, b = before[p.tier], after[p.tier]
        instances = serving.instances
        done = max(b.success - a.success, 1.0)
        executions = max(b.executions - a.executions, 1.0)
        # Triton charges each request of a batch the batch's compute: per execution it is busy time
        row[f"{p.tier}_util"] = round((b.compute_us - a.compute_us) / done * executions / 1e6 / window / instances, 3)
        row[f"{p.tier}_queue_ms"] = round((b.queue_us - a.queue_us) / 1e3 / done, 1)
        row[f"{p.tier}_batch"] = round(done / max(b.executions - a.executions, 1.0), 2)
    row["first_error"] = errors[0][:200] if errors else ""
    return row


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1)


def run(cameras: list[int], scheme_name: str, warmup: float, window: float, timeout_s: float) -> list[dict]:
    import numpy as np
    import torch

    from aiflow.model.family import load_family

    torch.set_num_threads(1)  # as a stage instance: one thread
    scheme = get_scheme(scheme_name)
    if scheme.chain[0].tier != "device" or len(scheme.chain) < 2:
        raise SystemExit(f"--scheme {scheme_name}: choose a scheme that starts on the device and goes on (split, split-spec)")
    family = load_family()
    blobs = images()
    rows = []
    with tempfile.TemporaryDirectory(prefix="aiflow-capacity-") as tmp:
        runtime, flow = start_runtime(Conditions(), wires=[], state_path=Path(tmp) / "state")
        try:
            for config in CONFIGS:
                flow.apply(scheme_wires(scheme, config))
                warm = device_stage(flow, scheme, family, timeout_s)
                for blob in blobs[:3]:  # the first calls after a load are slow (torch warms up)
                    warm.run({"IMAGE": np.array([blob], dtype=object)})
                warm.close()
                for n in cameras:
                    row = measure(flow, scheme, family, config, n, blobs, warmup, window, timeout_s)
                    rows.append(row)
                    print(_line(row, scheme), flush=True)
        finally:
            runtime.stop()
    return rows


def _line(r: dict, scheme) -> str:
    tiers = " ".join(
        f"{p.tier} {100 * r[f'{p.tier}_util']:.0f}%/q{r[f'{p.tier}_queue_ms']:.0f}ms/b{r[f'{p.tier}_batch']:g}" for p in scheme.chain
    )
    return (f"{r['config']:<10} N={r['cameras']:<3} {r['throughput_rps']:6.2f} req/s  p50 {r['p50_ms']:7.0f}  p95 {r['p95_ms']:7.0f}  "
            f"p99 {r['p99_ms']:7.0f} ms  failed {r['failed']}  cpu {r['cpu_percent']:.0f}%  {tiers}")


def table(rows: list[dict], scheme) -> list[str]:
    tiers = [p.tier for p in scheme.chain]
    head = ["config", "cameras", "req/s", "p50 ms", "p95 ms", "p99 ms", "failed", "CPU %"]
    head += [f"{t} util / queue ms / batch" for t in tiers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], r["cameras"], f"{r['throughput_rps']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}",
                 f"{r['p99_ms']:.0f}", r["failed"], f"{r['cpu_percent']:.0f}"]
        cells += [f"{100 * r[f'{t}_util']:.0f}% / {r[f'{t}_queue_ms']:.0f} / {r[f'{t}_batch']:g}" for t in tiers]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def write(rows: list[dict], scheme, out: Path, args) -> None:
    write_csv(out / "capacity.csv", rows)
    header = (f"Scheme {scheme.name}, `aiflow up` conditions (compute factors device 8x, edge 2x, cloud 1x; "
              f"links 2/20 Mbit/s 20 ms, 50/200 Mbit/s 40 ms), closed-loop cameras, {args.warmup:g} s warm-up "
              f"then a {args.window:g} s window per row, on this machine ({_cores()} cores).")
    (out / "capacity.md").write_text("\n".join([header, "", *table(rows, scheme), ""]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        n = [r["cameras"] for r in mine]
        ax1.plot(n, [r["throughput_rps"] for r in mine], marker="o", label=config)
        ax2.plot(n, [r["p95_ms"] for r in mine], marker="o", label=f"{config} p95")
        ax2.plot(n, [r["p50_ms"] for r in mine], marker=".", linestyle="--", label=f"{config} p50")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cameras")
        ax.legend(fontsize=8)
    ax1.set_ylabel("captions per second")
    ax2.set_ylabel("latency at the camera (ms)")
    ax2.set_yscale("log")
    fig.suptitle(f"{scheme.name}: one edge and one cloud shared by N cameras")
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=120)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", default="1,2,4,8,16,32", help="camera counts, comma-separated")
    ap.add_argument("--scheme", default="split-spec")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before each window")
    ap.add_argument("--window", type=float, default=8.0, help="seconds measured per row")
    ap.add_argument("--timeout", type=float, default=60.0, help="a camera's request timeout, seconds")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    args = ap.parse_args(argv)
    cameras = sorted({int(x) for x in args.cameras.split(",")})
    if not cameras or cameras[0] < 1:
        ap.error("--cameras: positive integers, e.g. 1,2,4")
    scheme = get_scheme(args.scheme)
    rows = run(cameras, args.scheme, args.warmup, args.window, args.timeout)
    print("\n".join(table(rows, scheme)))
    write(rows, scheme, args.out, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
