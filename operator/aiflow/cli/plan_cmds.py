"""`aiflow plan`: the planner's choice for a flow on a cluster snapshot, offline, with its alternatives.

The same solver the operator calls; the cluster comes from a snapshot file (kind ClusterSnapshot,
see docs/planner.md) and the costs from a profile (the shipped default unless --profile).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aiflow.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="choose split, codec, decoding and tiers for a flow on a cluster snapshot",
        description="Plan an AIFlow offline: the fastest split layer, feature codec, decoding mode and "
        "tier of every auto stage for the cluster described by a snapshot file, with per-hop predicted "
        "latency and the runner-up alternatives.")
    p.add_argument("-f", "--filename", required=True, metavar="FLOW.yaml", help="AIFlow manifest, or - for stdin")
    p.add_argument("--cluster", required=True, metavar="CLUSTER.yaml",
                   help="cluster snapshot: tiers (nodes, speed, load, memory) and links (examples/cluster-*.yaml)")
    p.add_argument("--profile", metavar="PROFILE.yaml",
                   help="model profile (default: the shipped one, or what `aiflow profile` measured)")
    p.add_argument("--min-quality", type=float, metavar="Q",
                   help="quality floor, 0..100 on the profile's metric (default: uncompressed quality minus 1)")
    p.add_argument("--alternatives", type=int, default=3, metavar="N", help="runner-ups to show (default 3)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_plan)

    p = subparsers.add_parser(
        "profile", help="measure the planner's profile on real Triton servers of this machine",
        description="Start a tritonserver with the stage models of model_repo/, measure what each piece of "
        "the captioning model costs (encoder layers, decoder steps, verify pass, Triton calls), the bytes of "
        "every split and codec, and caption quality on held-out scenes; write a PlannerProfile (docs/planner.md) "
        "marked `source: measured` with the machine it was measured on.")
    p.add_argument("--out", metavar="FILE", help="write here (default: print to stdout)")
    p.add_argument("--format", choices=("yaml", "json", "configmap"), default="yaml",
                   help="the profile as YAML or JSON, or a ConfigMap manifest holding it as profile.yaml")
    p.add_argument("--configmap", default="aiflow-profile", metavar="NAME", help="ConfigMap name (--format configmap)")
    p.add_argument("-n", "--namespace", default=None, help="ConfigMap namespace (--format configmap)")
    p.add_argument("--quick", action="store_true", help="few scenes and repeats: a valid profile in about a minute, noisier")
    p.add_argument("--images", type=int, default=None, metavar="N", help="held-out scenes for bytes and quality (default 32)")
    p.add_argument("--repeats", type=int, default=None, metavar="R", help="timed requests per scene and configuration (default 5)")
    p.add_argument("--model-repo", default=None, metavar="DIR", help="Triton model repository (default: model_repo/ of this checkout)")
    p.set_defaults(func=cmd_profile)


def cmd_plan(args) -> int:
    from aiflow.api.spec import parse_flow
    from aiflow.api.validate import validate_manifest
    from aiflow.cli.operator_cmds import flow_label, read_flows
    from aiflow.planner.cluster import declared_links, load_cluster
    from aiflow.planner.documents import DocumentError
    from aiflow.planner.problem import PlanError, Problem
    from aiflow.planner.profile import load_profile
    from aiflow.planner.solver import plan

    if args.alternatives < 0:
        raise CLIError("--alternatives must be 0 or more")
    if args.min_quality is not None and not 0 <= args.min_quality <= 100:
        raise CLIError("--min-quality must be between 0 and 100")
    docs = read_flows(args.filename)
    if len(docs) != 1:
        raise CLIError(f"{args.filename} holds {len(docs)} documents; plan one AIFlow at a time")
    problems = validate_manifest(docs[0])
    if problems:
        raise CLIError(f"{flow_label(docs[0], 0)} is not valid:\n" + "\n".join(f"  {p}" for p in problems))
    flow = parse_flow(docs[0])
    try:
        profile = load_profile(args.profile)
        cluster = load_cluster(args.cluster, declared_links(flow))
        result = plan(Problem(flow, cluster, profile, args.min_quality), alternatives=args.alternatives)
    except (DocumentError, PlanError) as exc:
        raise CLIError(str(exc)) from exc
    if args.output == "json":
        out = result.to_dict()
        out["profile"] = {"source": profile.source, "qualityMetric": profile.quality_metric, "qualitySource": profile.quality_source}
        out["links"] = [
            {"from": l.src, "to": l.dst, "bandwidthMbps": l.bandwidth_mbps, "rttMs": l.rtt_ms, "source": l.source}
            for l in cluster.links.values()
        ]
        print(json.dumps(out, indent=2))
    else:
        print(format_table(result, cluster, profile))
    return 0


def format_table(result, cluster, profile) -> str:
    """The plan as a person reads it: reason, the options ranked, the chosen one's breakdown, inputs."""
    from aiflow import TIERS

    lines = [f"flow {result.flow}: {result.reason}", ""]
    header = ("", "PLACEMENT", "SPLIT", "CODEC", "DECODING", "LATENCY_MS", "UPSTREAM_B", "QUALITY")
    rows = [header]
    for rank, option in enumerate((result.chosen, *result.alternatives)):
        c, e = option.candidate, option.estimate
        rows.append((
            "*" if rank == 0 else str(rank + 1),
            ",".join(f"{s}:{t}" for s, t in zip(result.stages, c.tiers)),
            "-" if c.split is None else str(c.split),
            c.codec or "-",
            c.decoding,
            f"{e.latency_ms:.1f}",
            f"{e.bytes_upstream:.0f}",
            f"{e.quality:g}",
        ))
    lines += _columns(rows)
    lines += ["", "chosen plan, step by step:"]
    steps = [("STEP", "WHERE", "PAYLOAD", "BYTES", "MS", "OF WHICH QUEUEING")]
    est = result.chosen.estimate
    for hop, stage in zip(est.hops, est.stages):
        where = f"{hop.src_tier}->{hop.dst_tier}" if hop.crosses else hop.dst_tier
        steps.append((f"call {hop.src}->{hop.dst}", where, hop.payload, f"{hop.bytes:.0f}", f"{hop.ms:.1f}", ""))
        steps.append((f"run {stage.stage} ({stage.model})", stage.tier, "", "", f"{stage.ms:.1f}", f"{stage.queue_ms:.1f}"))
    steps.append(("total", "", "", "", f"{est.latency_ms:.1f}", f"{sum(s.queue_ms for s in est.stages):.1f}"))
    lines += _columns(steps)
    lines += ["", "inputs:"]
    for t in TIERS:
        s = cluster.tier(t)
        lines.append(
            f"  tier {t}: {s.ready_nodes}/{s.nodes} nodes Ready, compute x{s.compute_factor:g}, "
            f"{s.utilisation:.0%} busy, stage instances {s.busy:.0%} busy (queueing x{s.queueing:.2f}), "
            f"{s.memory_mib:g} MiB per node ({s.source})"
        )
    for link in cluster.links.values():
        lines.append(f"  link {link.src}->{link.dst}: {link.bandwidth_mbps:.3g} Mbit/s, {link.rtt_ms:g} ms RTT ({link.source})")
    m = profile.machine
    note = " -- plausible defaults, not measurements" if profile.source == "default" else (
        f" on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, {m.get('measuredAt', '?')})" if m else "")
    lines.append(f"  profile: {profile.source}{note}; quality {profile.quality_metric} from {profile.quality_source}")
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def cmd_profile(args) -> int:
    import sys
    from dataclasses import replace

    from aiflow.local.profiling import QUICK, ProfilingError, Settings, measure, profile_document, render
    from aiflow.planner.profile import ProfileError, profile_from_dict

    settings = QUICK if args.quick else Settings()
    if args.images is not None:
        settings = replace(settings, images=args.images, timing_images=min(settings.timing_images, args.images))
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    try:
        settings.check()
    except ValueError as exc:
        raise CLIError(f"--images/--repeats: {exc}") from None
    if args.out and Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a directory; give a file name, e.g. {Path(args.out) / 'profile.yaml'}")
    log = lambda line: print(f"aiflow profile: {line}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        doc = profile_document(measure(args.model_repo, settings, log))
        profile_from_dict(doc, where="the measured profile")  # never hand out a profile the planner refuses
    except (ProfilingError, ProfileError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None
    text = render(doc, args.format, args.configmap, args.namespace)
    if not args.out:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(out)  # whole or not at all
    except OSError as exc:
        raise CLIError(f"cannot write {out}: {exc.strerror or exc}") from None
    log(f"wrote {out} ({args.format}); use it with `aiflow plan --profile {out}`")
    return 0
