"""`aiflow operator`, `aiflow validate`, `aiflow render`: the control plane from the command line.

`validate` and `render` run offline through the same functions the operator's reconcile calls.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import yaml

from aiflow.cli import CLIError

NODES_HELP = (
    "nodes of the cluster to place the flow on: a YAML list of Node objects (e.g. `kubectl get nodes "
    "-o yaml`), or a map of tiers to node counts, e.g. `tiers: {device: 1, edge: 1, cloud: 0}`; "
    "default: every tier has nodes"
)


STAGE_IMAGE_HELP = (
    "image of the stages placed on TIER when the AIFlow names none (repeatable; default: "
    "$AIFLOW_STAGE_IMAGES, else the CPU stage image on device and edge and the GPU one on cloud)"
)


def _stage_images(args) -> dict[str, str]:
    """The operator's image per tier: $AIFLOW_STAGE_IMAGES and the built-in defaults, then --stage-image."""
    from aiflow.api.images import configured_tier_images, parse_tier_images

    try:
        return {**configured_tier_images(), **parse_tier_images(args.stage_image or (), "--stage-image")}
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "operator", help="run the AIFlow operator against the cluster of the current kubeconfig",
        description="Run the AIFlow operator (kopf) against the cluster of the current kubeconfig, "
        "or in-cluster credentials in a pod.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", metavar="NS",
                       help="watch AIFlows in this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch AIFlows in every namespace (the default)")
    p.add_argument("--liveness", metavar="URL",
                   help="serve a liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--peering", metavar="NAME",
                   help="coordinate with other operator replicas through this KopfPeering object "
                   "(leader election); default: run standalone")
    p.add_argument("--priority", type=int, metavar="N",
                   help="peering priority of this replica: the highest acts, the others stand by "
                   "(default with --peering: random, so replicas of one Deployment never tie and pause)")
    p.add_argument("--resync-seconds", type=float, metavar="S",
                   help="seconds between periodic re-checks of every flow "
                   "(default: $AIFLOW_RESYNC_SECONDS or 30)")
    p.add_argument("--stage-image", action="append", metavar="TIER=IMAGE", help=STAGE_IMAGE_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="log every handler call")
    p.set_defaults(func=cmd_operator)

    p = subparsers.add_parser(
        "validate", help="check an AIFlow manifest and print every problem",
        description="Check AIFlow manifests offline (schema, CEL rules, models, stage contracts, "
        "and tiers when --nodes is given). Exits 1 when any problem is found.")
    p.add_argument("-f", "--filename", required=True, metavar="FLOW.yaml", help="manifest file, or - for stdin")
    p.add_argument("--nodes", metavar="NODES.yaml", help=NODES_HELP)
    p.set_defaults(func=cmd_validate)

    p = subparsers.add_parser(
        "render", help="print the Kubernetes objects the operator would apply for a flow",
        description="Print, as multi-document YAML, exactly the objects the operator's reconcile "
        "applies for an AIFlow (offline). ownerReferences appear when the manifest carries a "
        "metadata.uid (e.g. one read back with kubectl get -o yaml).")
    p.add_argument("-f", "--filename", required=True, metavar="FLOW.yaml", help="manifest file, or - for stdin")
    p.add_argument("--nodes", metavar="NODES.yaml", help=NODES_HELP)
    p.add_argument("--namespace", default=None, metavar="NS",
                   help="namespace when the manifest names none (default: default)")
    p.add_argument("--stage-image", action="append", metavar="TIER=IMAGE", help=STAGE_IMAGE_HELP)
    p.set_defaults(func=cmd_render)


def _read_yaml_documents(path: str) -> list:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise CLIError(f"{path} is not valid YAML: {exc}") from exc


def read_flows(path: str) -> list:
    """The manifests of a file (or - for stdin); every command that takes -f FLOW.yaml reads them here."""
    docs = _read_yaml_documents(path)
    if not docs:
        raise CLIError(f"{path} holds no manifest")
    return docs


def _cluster(path: str | None):
    from aiflow.api.cluster import ClusterView, cluster_from_document

    if path is None:
        return ClusterView.every_tier()
    docs = _read_yaml_documents(path)
    try:
        return cluster_from_document(docs[0] if len(docs) == 1 else docs)
    except (ValueError, IndexError) as exc:
        raise CLIError(f"{path}: {exc}") from exc


def flow_label(doc, index: int) -> str:
    """How messages name a manifest: its AIFlow name, else its position in the file."""
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc, dict) else None
    return f"AIFlow {name}" if name else f"document {index + 1}"


def cmd_validate(args) -> int:
    from aiflow.api.validate import validate_manifest

    cluster = _cluster(args.nodes) if args.nodes else None
    failed = 0
    for i, doc in enumerate(read_flows(args.filename)):
        problems = validate_manifest(doc, cluster=cluster)
        if problems:
            failed += 1
            print(f"{flow_label(doc, i)}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"{flow_label(doc, i)}: OK")
    return 1 if failed else 0


def cmd_render(args) -> int:
    from aiflow.api.spec import parse_flow
    from aiflow.api.validate import validate_manifest
    from aiflow.controller.recovery import annotate
    from aiflow.controller.rescheduler import record_of
    from aiflow.controller.revisions import render_revision
    from aiflow.planner.placement import resolve_placement

    cluster = _cluster(args.nodes)
    images = _stage_images(args)
    objects = []
    for i, doc in enumerate(read_flows(args.filename)):
        problems = validate_manifest(doc, cluster=cluster)
        if problems:
            lines = "\n".join(f"  {p}" for p in problems)
            raise CLIError(f"{flow_label(doc, i)} is not valid; nothing rendered:\n{lines}")
        flow = parse_flow(doc, args.namespace or "default", default_images=images)
        if args.namespace and flow.namespace != args.namespace:
            raise CLIError(f"{flow_label(doc, i)} names namespace {flow.namespace}, not {args.namespace}")
        # A new flow starts at revision 1, serving itself: what reconcile applies first, its
        # Deployments annotated with the plan (so that it survives a loss of status).
        placement = resolve_placement(flow, cluster)
        objects.extend(annotate(render_revision(flow, placement, 1, 1, cluster), record_of(flow, placement, 1, time.time())))
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False, default_flow_style=False)
    return 0


def cmd_operator(args) -> int:
    import asyncio
    import logging

    if args.resync_seconds is not None:
        if args.resync_seconds <= 0:
            raise CLIError("--resync-seconds must be positive")
        os.environ["AIFLOW_RESYNC_SECONDS"] = str(args.resync_seconds)
    from aiflow.api.images import STAGE_IMAGES_ENV

    # Every parse_flow of the reconcile reads the operator's per-tier defaults from here.
    os.environ[STAGE_IMAGES_ENV] = ",".join(f"{t}={i}" for t, i in _stage_images(args).items())
    import kopf

    import aiflow.controller.handlers  # noqa: F401  registers the handlers

    kopf.configure(verbose=args.verbose)
    for noisy in ("urllib3", "celpy", "kubernetes"):  # their debug output drowns the operator's
        logging.getLogger(noisy).setLevel(logging.WARNING)
    namespaces = args.namespace or ()
    priority = args.priority
    if priority is None and args.peering:
        # kopf pauses every operator when peers share a priority: replicas must differ.
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    try:
        kopf.run(
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness,
            peering_name=args.peering,
            standalone=args.peering is None,
            priority=priority,
        )
    except KeyboardInterrupt:
        pass
    except asyncio.CancelledError:
        pass
    return 0
