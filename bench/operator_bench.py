"""How fast the operator deploys flows, and how much memory it takes.

For 1, 10 and 100 AIFlows (the captioning example, three stages each) applied at once to the
emulated Kubernetes API server (tests/kube), measures the time from the first apply until every
stage's Deployment and Service exists, and until every flow reports Ready=True (the Deployment
controller stand-in marks Deployments ready as soon as they appear: no kubelet runs here), and the
operator's peak resident memory. The operator runs as its own process, exactly as the chart runs
it (`aiflow operator`), against the emulated server.

    python bench/operator_bench.py [--flows 1 10 100] [--timeout 120]

Prints a table and writes bench/results/operator_bench.csv and .png. Targets: 100 flows Ready
within 30 s on 2 cores, operator peak RSS under 200 MB.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout root: bench.* and tests.* imports

from bench.report import write_csv  # noqa: E402
from tests.kube.apiserver import EmulatedApiServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EXAMPLE = yaml.safe_load((ROOT / "examples" / "captioning.yaml").read_text())
TARGET_SECONDS, TARGET_MB = 30.0, 200.0


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size of a process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_operator(server: EmulatedApiServer, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(server.kubeconfig)}
    return subprocess.Popen(
        [sys.executable, "-m", "aiflow", "operator", "--namespace", "default"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
    )


def wait(predicate, timeout: float, what: str, interval: float = 0.5) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic()


def ready_flows(server: EmulatedApiServer) -> int:
    count = 0
    for flow in server.list("aiflows", "default"):
        conditions = (flow.get("status") or {}).get("conditions") or ()
        count += any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return count


def run(flows: int, timeout: float) -> dict:
    # The emulator's own validation of built-in objects against the Kubernetes schemas costs the
    # benchmark process CPU that a real API server would not take from the operator: off here.
    with EmulatedApiServer(validate_builtin=False) as server:
        server.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
        for tier in ("device", "edge", "cloud"):
            server.seed_node(f"{tier}-1", tier)
        # The operator's log goes next to the emulator's files, which vanish with it.
        operator = start_operator(server, server.workdir / "operator.log")
        try:
            # The operator is up once it has registered its watches (it lists the flows first).
            wait(lambda: any(r.resource == "aiflows" and r.verb in ("list", "watch") for r in server.request_log),
                 60, "the operator to start watching")
            server.start_deployment_controller(interval=0.5)  # plays the Deployment controller + kubelets
            start_rss = peak_rss_mb(operator.pid)
            start_cpu, bench_cpu = cpu_seconds(operator.pid), time.process_time()
            start = time.monotonic()
            for i in range(flows):
                flow = copy.deepcopy(EXAMPLE)
                flow["metadata"] = {"name": f"captioning-{i}", "namespace": "default"}
                server.create(flow)
            created = wait(lambda: len(server.list("deployments", "default")) == 3 * flows
                           and len(server.list("services", "default")) == 3 * flows, timeout, "stage objects")
            ready = wait(lambda: ready_flows(server) == flows, timeout, "every flow Ready")
            log = server.request_log
            requests = sum(1 for r in log if r.user_agent.startswith(("aiflow-operator", "kopf")))
            breakdown = collections.Counter(
                (r.user_agent.split("/")[0], r.verb, (r.resource or r.path) + (f"/{r.subresource}" if r.subresource else ""))
                for r in log if r.user_agent.startswith(("aiflow-operator", "kopf")))
            with open(RESULTS / f"operator_{flows}_requests.txt", "w") as fh:
                for (agent, verb, resource), count in breakdown.most_common():
                    fh.write(f"{count:6d} {agent:16s} {verb:8s} {resource}\n")
            return {
                "flows": flows,
                "objects_created_s": round(created - start, 2),
                "ready_s": round(ready - start, 2),
                "operator_requests": requests,
                "operator_cpu_s": round(cpu_seconds(operator.pid) - start_cpu, 2),
                "apiserver_cpu_s": round(time.process_time() - bench_cpu, 2),
                "load_avg_1m": round(os.getloadavg()[0], 1),  # other work on the machine
                "operator_idle_rss_mb": round(start_rss, 1),
                "operator_peak_rss_mb": round(peak_rss_mb(operator.pid), 1),
            }
        except TimeoutError:
            print((server.workdir / "operator.log").read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    flows = [r["flows"] for r in rows]
    ax1.plot(flows, [r["objects_created_s"] for r in rows], "o-", label="all stage objects created")
    ax1.plot(flows, [r["ready_s"] for r in rows], "s-", label="all flows Ready")
    ax1.axhline(TARGET_SECONDS, color="grey", ls="--", label=f"target {TARGET_SECONDS:.0f} s")
    ax1.set(xscale="log", xlabel="AIFlows applied at once", ylabel="seconds after apply", title="Time to deploy")
    ax1.legend()
    ax2.bar([str(f) for f in flows], [r["operator_peak_rss_mb"] for r in rows])
    ax2.axhline(TARGET_MB, color="grey", ls="--", label=f"target {TARGET_MB:.0f} MB")
    ax2.set(xlabel="AIFlows", ylabel="MiB", title="Operator peak RSS")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = [run(n, args.timeout) for n in args.flows]
    columns = list(rows[0])
    print(" | ".join(f"{c:>20}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>20}" for c in columns))
    write_csv(RESULTS / "operator_bench.csv", rows, columns)
    plot(rows, RESULTS / "operator_bench.png")
    print(f"wrote {RESULTS / 'operator_bench.csv'} and {RESULTS / 'operator_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
