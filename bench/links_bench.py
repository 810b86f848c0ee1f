"""Emulated links: configured vs measured throughput (both directions) and added round-trip latency.

    python bench/links_bench.py [--seconds 1.0] [--out bench/results]

Prints a table and writes links_bench.csv (and links_bench.png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/<name>.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiflow.local.links import (
    Link,
    LinkConfig,
    LinkProxy,
    ProbeServer,
    format_rate,
    probe_download,
    probe_rtt,
    probe_upload,
)
from bench.report import write_csv  # noqa: E402

RATES_MBIT = (1, 10, 50, 100, 200)
LATENCIES_MS = (0, 10, 50)
CHAIN = (("5mbit", "5ms"), ("50mbit", "20ms"))  # device->edge, edge->cloud


def measure(targets: list[LinkProxy], peer: ProbeServer, rate_bps: float | None, seconds: float) -> dict:
    address = ("127.0.0.1", targets[0].port)
    nbytes = int((rate_bps or 400e6) / 8 * seconds)
    base = statistics.median(probe_rtt(peer.address, 30))
    rtts = probe_rtt(address, 30)
    return {
        "up_mbit": probe_upload(address, nbytes) / 1e6,
        "down_mbit": probe_download(address, nbytes) / 1e6,
        "added_rtt_ms": (statistics.median(rtts) - base) * 1e3,
        "added_rtt_p90_ms": (sorted(rtts)[int(0.9 * len(rtts))] - base) * 1e3,
    }


def run(seconds: float) -> list[dict]:
    rows = []
    with ProbeServer() as peer:
        for mbit in RATES_MBIT:
            for latency_ms in LATENCIES_MS:
                config = LinkConfig.symmetric(mbit * 1e6, latency_ms / 1e3)
                proxy = LinkProxy(Link("bench", config), peer.address).start()
                try:
                    result = measure([proxy], peer, mbit * 1e6, seconds)
                finally:
                    proxy.stop()
                rows.append({"path": "one link", "bandwidth_mbit": mbit, "rtt_ms": 2 * latency_ms, **result})
        links = [Link(f"hop{i}", LinkConfig.symmetric(rate, delay)) for i, (rate, delay) in enumerate(CHAIN)]
        second = LinkProxy(links[1], peer.address).start()
        first = LinkProxy(links[0], ("127.0.0.1", second.port)).start()
        try:
            slowest = min(link.config.bandwidth_up for link in links)
            result = measure([first, second], peer, slowest, seconds)
        finally:
            first.stop()
            second.stop()
        rtt = 2 * sum(link.config.latency_up for link in links) * 1e3
        rows.append({"path": "two links", "bandwidth_mbit": slowest / 1e6, "rtt_ms": rtt, **result})
    for row in rows:
        row["up_error_pct"] = 100 * (row["up_mbit"] / row["bandwidth_mbit"] - 1)
        row["down_error_pct"] = 100 * (row["down_mbit"] / row["bandwidth_mbit"] - 1)
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'path':<10} {'bandwidth':>10} {'up':>9} {'err%':>6} {'down':>9} {'err%':>6} "
              f"{'RTT set':>8} {'RTT +':>8} {'p90':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['path']:<10} {format_rate(r['bandwidth_mbit'] * 1e6):>10} {r['up_mbit']:>8.2f}M "
              f"{r['up_error_pct']:>+6.1f} {r['down_mbit']:>8.2f}M {r['down_error_pct']:>+6.1f} "
              f"{r['rtt_ms']:>6.1f}ms {r['added_rtt_ms']:>6.2f}ms {r['added_rtt_p90_ms']:>5.1f}ms")


def write_outputs(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "links_bench.csv", rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    single = [r for r in rows if r["path"] == "one link"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.loglog([r["bandwidth_mbit"] for r in single], [r["up_mbit"] for r in single], "o", label="up")
    ax1.loglog([r["bandwidth_mbit"] for r in single], [r["down_mbit"] for r in single], "x", label="down")
    ax1.loglog(RATES_MBIT, RATES_MBIT, "k--", lw=0.8, label="configured")
    ax1.set(xlabel="configured Mbit/s", ylabel="measured Mbit/s", title="throughput")
    ax1.legend()
    ax2.plot([r["rtt_ms"] for r in rows], [r["added_rtt_ms"] for r in rows], "o")
    ax2.plot([0, max(r["rtt_ms"] for r in rows)], [0, max(r["rtt_ms"] for r in rows)], "k--", lw=0.8)
    ax2.set(xlabel="configured RTT ms", ylabel="measured added RTT ms", title="latency")
    fig.tight_layout()
    fig.savefig(out / "links_bench.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds of data per throughput run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = run(args.seconds)
    print_table(rows)
    write_outputs(rows, args.out)
    print(f"\nwrote {args.out / 'links_bench.csv'}")


if __name__ == "__main__":
    main()
