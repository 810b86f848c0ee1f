"""The rescheduler end to end: the real kopf operator re-planning flows on the emulated API server
as link measurements, node load and tiers change, and moving them make-before-break.

What plays the rest of a cluster here, and says so: the link probe is played by writing its
measurement ConfigMap (`publish_links`); metrics-server by `serve_node_metrics`/`set_node_metrics`; the Deployment controller and
kubelets by the stand-in that marks Deployments ready (gated where a test needs a new revision to
stay unready for a while); the EndpointSlice controller by its stand-in (gated where a test holds
back the news that the entry's endpoints moved). The rescheduler ticks every 5 s; waits are bounded, never timed.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import pytest

from aiflow.controller.revisions import REVISION_LABEL
from aiflow.linkprobe import MEASUREMENT_LABELS, Link, measurement_data, measurement_name
from tests.operator.conftest import NS, Cluster, aiflow

FLOW = "moving"
GOOD_UPLINK = {"edge": Link(rtt_ms=10, bandwidth_mbps=20)}
THIN_UPLINK = {"edge": Link(rtt_ms=50, bandwidth_mbps=0.5)}
PROBES = "aiflow-system"  # where the link probes publish (the chart's release namespace)


def publish_links(apiserver, node: str, tier: str, links: dict, age_s: float = 0.0, raw: dict | None = None) -> None:
    """Write what the link probe of `node` publishes: its ConfigMap, measured `age_s` seconds ago."""
    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age_s)
    data = {**measurement_data(node, tier, links, at, 180), **(raw or {})}
    name = measurement_name(node)
    if apiserver.get("configmaps", name, PROBES) is None:
        apiserver.create({"apiVersion": "v1", "kind": "ConfigMap", "data": data,
                          "metadata": {"name": name, "namespace": PROBES, "labels": MEASUREMENT_LABELS}})
    else:
        apiserver.patch("configmaps", name, {"data": data}, PROBES)
WAIT = 90  # generous bound for several rescheduler turns on a loaded machine


def auto_flow(cooldown: int, min_improvement: int = 10, **spec) -> dict:
    stages = [{"name": "head", "model": "vision_head"}, {"name": "drafter", "model": "caption_drafter"},
              {"name": "verifier", "model": "caption_verifier"}]
    return aiflow(FLOW, *stages, rescheduling={"enabled": True, "intervalSeconds": 5,
                                               "minImprovementPercent": min_improvement,
                                               "cooldownSeconds": cooldown}, **spec)


@pytest.fixture
def tiers(apiserver, run_kopf_operator, monkeypatch) -> Cluster:
    """A slow device (x8) whose link probe measured a good uplink, an edge (x1), a fast cloud (x0.5)."""
    apiserver.kubectl("apply", "--validate=false", "-f", "crds/")
    apiserver.create_namespace(PROBES)
    monkeypatch.setenv("AIFLOW_LINK_NAMESPACE", PROBES)  # as the chart sets it with linkProbe.enabled
    apiserver.seed_node("device-1", "device", labels={"aiflow.io/compute-factor": "8"})
    publish_links(apiserver, "device-1", "device", GOOD_UPLINK)
    apiserver.seed_node("edge-1", "edge")
    apiserver.seed_node("cloud-1", "cloud", labels={"aiflow.io/compute-factor": "0.5"})
    held: set[str] = set()  # Services whose EndpointSlice does not follow while their names are here
    apiserver.start_endpointslice_controller(lambda service: service["metadata"]["name"] not in held)
    run_kopf_operator("aiflow.controller.handlers")
    cluster = Cluster(apiserver)
    cluster.held_slices = held
    return cluster


def status(cluster: Cluster) -> dict:
    return (cluster.flow(FLOW) or {}).get("status") or {}


def plan(cluster: Cluster) -> dict:
    return status(cluster).get("plan") or {}


def tiers_of(deployments: dict) -> dict[str, str]:
    return {n: d["spec"]["template"]["spec"]["nodeSelector"]["aiflow.io/tier"] for n, d in deployments.items()}


def env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def history(cluster: Cluster, plural: str) -> list[tuple[int, str, dict]]:
    """The server's watch history of one resource: (resourceVersion, event type, object)."""
    return cluster.api.call(lambda h: [(rv, kind, obj) for rv, (_, p), kind, obj, _old in h.history if p == plural])


def decisions_seen(cluster: Cluster, count: int) -> list[dict]:
    """Wait for `count` more rescheduler decisions (each changes status.lastDecision.time)."""
    seen = []
    last = (status(cluster).get("lastDecision") or {}).get("time")
    for _ in range(count):
        decision = cluster.wait(lambda: (d := status(cluster).get("lastDecision")) and d.get("time") != last and d,
                                message="the rescheduler's next decision", timeout=WAIT)
        last = decision["time"]
        seen.append(decision)
    return seen


def test_a_thinner_uplink_moves_the_flow_once_make_before_break(tiers):
    cluster = tiers
    release = threading.Event()  # revisions after the first stay unready until the test says so
    cluster.api.start_deployment_controller(
        lambda d: d["metadata"]["labels"].get(REVISION_LABEL) == "1" or release.is_set())
    cluster.api.create(auto_flow(cooldown=3600))
    cluster.wait_condition(FLOW, "Ready", "True")
    first = plan(cluster)
    # A fast uplink: the image goes to the edge, where the whole flow runs.
    assert first["revision"] == 1 and first["placement"] == {"head": "edge", "drafter": "edge", "verifier": "edge"}
    assert status(cluster)["links"][0] | {"bandwidthMbps": 0} == {"from": "device", "to": "edge", "bandwidthMbps": 0,
                                                                  "rttMs": 10.0, "source": "Measured"}
    old = set(cluster.children(FLOW))
    assert old == {f"{FLOW}-head", f"{FLOW}-drafter", f"{FLOW}-verifier"}

    publish_links(cluster.api, "device-1", "device", THIN_UPLINK)  # the probe measures 0.5 Mbit/s
    moving = cluster.wait(lambda: status(cluster).get("migration"), message="a move to start", timeout=WAIT)
    assert moving["revision"] == 2 and moving["placement"]["head"] == "device"
    new = {f"{FLOW}-head-r2", f"{FLOW}-drafter-r2", f"{FLOW}-verifier-r2"}
    cluster.wait(lambda: set(cluster.children(FLOW)) == old | new, message="the new revision beside the old")
    # The new chain is wired within itself; the entry Service still selects the serving revision.
    assert env_of(cluster.children(FLOW)[f"{FLOW}-head-r2"])["AIFLOW_NEXT_URL"] == f"{FLOW}-drafter-r2.{NS}.svc:8001"
    entry = cluster.api.get("services", f"{FLOW}-head", NS)
    assert entry["spec"]["selector"][REVISION_LABEL] == "1"
    assert tiers_of(cluster.children(FLOW))[f"{FLOW}-head-r2"] == "device"
    (migrating,) = cluster.wait(lambda: cluster.events("Migrating"), message="an Event for the move")
    assert "0.5 Mbit/s" in migrating["message"] or "predicted" in migrating["message"]
    assert plan(cluster)["revision"] == 1 and cluster.condition(FLOW, "Ready")["status"] == "True"

    release.set()  # the new pods come up
    cluster.wait(lambda: plan(cluster).get("revision") == 2 and set(cluster.children(FLOW)) == new,
                 message="traffic switched to revision 2 and revision 1 deleted", timeout=WAIT)
    assert cluster.api.get("services", f"{FLOW}-head", NS)["spec"]["selector"][REVISION_LABEL] == "2"
    assert set(cluster.children(FLOW, "services")) == {f"{FLOW}-head", f"{FLOW}-drafter-r2", f"{FLOW}-verifier-r2"}

    # Make-before-break, from the server's history: every new Deployment reported ready, then the
    # entry Service flipped, then the old Deployments were deleted.
    deployments = history(cluster, "deployments")
    ready_at = max(min(rv for rv, kind, obj in deployments if obj["metadata"]["name"] == name and
                       (obj.get("status") or {}).get("readyReplicas", 0) >= obj["spec"]["replicas"])
                   for name in new)
    deleted_at = min(rv for rv, kind, obj in deployments if kind == "DELETED" and obj["metadata"]["name"] in old)
    flipped_at = min(rv for rv, kind, obj in history(cluster, "services")
                     if obj["metadata"]["name"] == f"{FLOW}-head" and obj["spec"]["selector"].get(REVISION_LABEL) == "2")
    assert ready_at < flipped_at < deleted_at
    (migrated,) = cluster.wait(lambda: cluster.events("Migrated"), message="an Event for the finished move")
    assert "revision 2" in migrated["message"] and "revision 1 drained for 5 s and deleted" in migrated["message"]
    assert status(cluster)["lastMigrationTime"]

    # Once: further turns under the same conditions keep the new plan.
    for decision in decisions_seen(cluster, 2):
        assert decision["decision"] == "Kept"
    assert plan(cluster)["revision"] == 2 and "migration" not in status(cluster)
    assert len(cluster.events("Migrating")) == 1 and len(cluster.events("Migrated")) == 1


def slice_pods(cluster: Cluster, service: str) -> list[str]:
    """The pods the Service's EndpointSlices list as ready."""
    return [e["targetRef"]["name"] for s in cluster.api.list("endpointslices", NS, f"kubernetes.io/service-name={service}")
            for e in s.get("endpoints") or () if e["conditions"].get("ready")]


def migration(cluster: Cluster, phase: str):
    return (m := status(cluster).get("migration")) and m.get("phase") == phase and m


def test_the_old_chain_serves_until_the_new_one_has_taken_the_traffic_and_drained(tiers):
    cluster, entry = tiers, f"{FLOW}-head"
    cluster.api.start_deployment_controller()
    cluster.api.create(auto_flow(cooldown=3600, objective={"latencyMs": 4000}))
    cluster.wait_condition(FLOW, "Ready", "True")
    old = {f"{FLOW}-head", f"{FLOW}-drafter", f"{FLOW}-verifier"}
    old_services = {f"{FLOW}-drafter", f"{FLOW}-verifier"}
    cluster.wait(lambda: slice_pods(cluster, entry), message="the entry's endpoints")
    assert all(p.rsplit("-", 2)[0] == f"{FLOW}-head" for p in slice_pods(cluster, entry))

    cluster.held_slices.add(entry)  # the entry's endpoints will not follow its selector for now
    publish_links(cluster.api, "device-1", "device", THIN_UPLINK)  # the probe measures 0.5 Mbit/s
    switching = cluster.wait(lambda: migration(cluster, "Switching"), message="the entry switched", timeout=WAIT)
    assert switching["revision"] == 2 and switching["drainSeconds"] == 12  # 3 x the 4 s objective
    assert cluster.api.get("services", entry, NS)["spec"]["selector"][REVISION_LABEL] == "2"
    # Switched, but nothing shows the new chain behind the entry yet: the old chain stays whole.
    mark = len(cluster.api.request_log)
    cluster.wait(lambda: len(cluster.operator_reads("endpointslices", mark)) >= 3,
                 message="three looks at the entry's endpoints", timeout=WAIT)
    assert old <= set(cluster.children(FLOW)) and old_services <= set(cluster.children(FLOW, "services"))
    recorded = json.loads(cluster.api.get("services", entry, NS)["metadata"]["annotations"]["aiflow.io/move"])
    assert recorded | {"since": ""} == {"from": 1, "to": 2, "phase": "Switching", "since": ""}

    # The phase lives on the entry Service too: a lost status resumes the move, not a new one.
    cluster.api.patch("aiflows", FLOW, {"status": None}, NS, subresource="status")
    resumed = cluster.wait(lambda: migration(cluster, "Switching"), message="the move back in status", timeout=WAIT)
    assert resumed["revision"] == 2 and plan(cluster)["revision"] == 1
    assert old <= set(cluster.children(FLOW)) and old_services <= set(cluster.children(FLOW, "services"))

    released = time.time()
    cluster.held_slices.discard(entry)  # the entry's endpoints now list the new head's pods only
    cluster.wait(lambda: migration(cluster, "Draining"), message="the old chain draining", timeout=WAIT)
    assert old <= set(cluster.children(FLOW)) and old_services <= set(cluster.children(FLOW, "services"))
    cluster.wait(lambda: not old & set(cluster.children(FLOW)), message="the old chain deleted", timeout=WAIT)
    assert time.time() - released >= 12, "the old chain went before its drain grace was over"
    # One reconcile deletes the old Deployments, then the old Services.
    cluster.wait(lambda: not old_services & set(cluster.children(FLOW, "services")), message="the old Services deleted")
    assert plan(cluster)["revision"] == 2 and "migration" not in status(cluster)
    assert "aiflow.io/move" not in (cluster.api.get("services", entry, NS)["metadata"].get("annotations") or {})

    # The order, from the server's history: entry switched, then its endpoints moved, then the old went.
    flipped_at = min(rv for rv, kind, obj in history(cluster, "services")
                     if obj["metadata"]["name"] == entry and obj["spec"]["selector"].get(REVISION_LABEL) == "2")
    moved_at = min(rv for rv, kind, obj in history(cluster, "endpointslices")
                   if obj["metadata"]["labels"].get("kubernetes.io/service-name") == entry and obj.get("endpoints")
                   and all(e["targetRef"]["name"].rsplit("-", 2)[0] == f"{FLOW}-head-r2" for e in obj["endpoints"]))
    deleted_at = min(rv for rv, kind, obj in history(cluster, "deployments")
                     if kind == "DELETED" and obj["metadata"]["name"] in old)
    assert flipped_at < moved_at < deleted_at


def test_an_oscillating_tier_load_moves_the_flow_at_most_once_per_cooldown(tiers):
    cluster = tiers
    cluster.api.serve_node_metrics()  # metrics-server is installed
    for node in ("device-1", "edge-1", "cloud-1"):
        cluster.api.set_node_metrics(node, "100m")
    cluster.api.start_deployment_controller()
    cluster.api.create(auto_flow(cooldown=3600))
    cluster.wait(lambda: plan(cluster).get("placement", {}).get("drafter") == "edge", message="the flow on the edge")
    cluster.wait_condition(FLOW, "Ready", "True")

    decisions = []
    for busy in (True, False, True, False):  # the edge's load swings across the decision boundary
        cluster.api.set_node_metrics("edge-1", "3900m" if busy else "100m")
        decisions += decisions_seen(cluster, 2)
    assert plan(cluster)["revision"] == 2, "exactly one move"
    assert plan(cluster)["placement"]["drafter"] == "cloud"  # where the busy edge sent it
    assert len(cluster.events("Migrated")) == 1
    rejected = [d for d in decisions if d["decision"] == "Rejected"]
    assert rejected and all("cooldown" in d["reason"] for d in rejected)
    # One Event per change of decision, not one per turn.
    assert len(cluster.events("MigrationRejected")) <= 2 < len(rejected) + 1
    tiers_seen = {t["tier"]: t for t in status(cluster)["observations"]["tiers"]}
    assert tiers_seen["edge"]["utilisation"] < 0.5 and tiers_seen["cloud"]["computeFactor"] == 0.5


def test_a_tier_losing_every_node_fails_over_and_comes_back(tiers):
    cluster = tiers
    cluster.api.start_deployment_controller()
    publish_links(cluster.api, "device-1", "device", THIN_UPLINK)
    cluster.api.create(auto_flow(cooldown=0, min_improvement=5))
    cluster.wait_condition(FLOW, "Ready", "True")
    assert plan(cluster)["placement"] == {"head": "device", "drafter": "edge", "verifier": "edge"}
    assert cluster.condition(FLOW, "Degraded")["status"] == "False"

    cluster.api.remove_node("edge-1")  # the whole edge tier is gone
    degraded = cluster.wait_condition(FLOW, "Degraded", "True", "TierUnavailable")
    assert "edge has no Ready node" in degraded["message"]
    cluster.wait(lambda: plan(cluster).get("revision") == 2, message="the failover move finished", timeout=WAIT)
    assert plan(cluster)["placement"] == {"head": "device", "drafter": "cloud", "verifier": "cloud"}
    assert plan(cluster)["fallbackFrom"] == ["edge"]
    assert set(tiers_of(cluster.children(FLOW)).values()) == {"device", "cloud"}
    cluster.wait_condition(FLOW, "Ready", "True")
    (failover,) = cluster.wait(lambda: cluster.events("Failover"), message="a Warning for the failover")
    assert failover["type"] == "Warning" and "edge has no Ready node" in failover["message"]
    assert [e["type"] for e in cluster.events("TierUnavailable")] == ["Warning"]

    cluster.api.seed_node("edge-1", "edge")  # the edge is back
    cluster.wait_condition(FLOW, "Degraded", "False", "AllTiersAvailable")
    cluster.wait(lambda: plan(cluster).get("revision") == 3, message="the move back to the edge", timeout=WAIT)
    assert plan(cluster)["placement"] == {"head": "device", "drafter": "edge", "verifier": "edge"}
    assert "fallbackFrom" not in plan(cluster)
    cluster.wait(lambda: len(cluster.events("Migrated")) == 2, message="an Event for each move")  # kopf posts after the status


def test_garbage_measurements_are_survived_and_reported(tiers):
    cluster = tiers
    cluster.api.serve_node_metrics()
    cluster.api.handler["get /apis/metrics.k8s.io/v1beta1/nodes"] << 500  # noqa: B015  (kmock's DSL)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    publish_links(cluster.api, "device-1", "device", {}, raw={
        "edge.bandwidth-mbps": "NaN", "edge.rtt-ms": "-3", "edge.measured-at": stamp,
        "cloud.bandwidth-mbps": "fast", "cloud.rtt-ms": "7", "cloud.measured-at": stamp})
    cluster.api.patch_node("edge-1", {"metadata": {"labels": {"aiflow.io/compute-factor": "-2"}}})
    cluster.api.start_deployment_controller()
    cluster.api.create(auto_flow(cooldown=3600, links=[{"from": "device", "to": "edge", "bandwidthMbps": 20, "rttMs": 10}]))
    cluster.wait_condition(FLOW, "Ready", "True")
    decisions_seen(cluster, 1)  # a rescheduler turn with the failing metrics API
    notes = " | ".join(status(cluster)["observations"]["notes"])
    assert "metrics.k8s.io failed" in notes and "load counts as 0" in notes
    assert "compute-factor='-2' is not a positive number" in notes
    assert "towards edge ignored" in notes and "towards cloud ignored" in notes
    hop = next(h for h in status(cluster)["links"] if h["from"] == "device") if status(cluster)["links"] else None
    assert hop is None or hop["source"] == "Declared"
    latency = status(cluster)["latency"]
    assert latency["predictedMs"] > 0 and latency["source"].startswith("unavailable")  # no Triton reachable here
    assert plan(cluster)["revision"] == 1 and status(cluster)["phase"] == "Ready"


def test_a_lost_status_is_recovered_from_the_objects_without_touching_the_serving_revision(tiers):
    cluster = tiers
    cluster.api.start_deployment_controller()
    cluster.api.create(auto_flow(cooldown=3600))
    cluster.wait_condition(FLOW, "Ready", "True")
    publish_links(cluster.api, "device-1", "device", THIN_UPLINK)
    serving = {f"{FLOW}-head-r2", f"{FLOW}-drafter-r2", f"{FLOW}-verifier-r2"}
    cluster.wait(lambda: plan(cluster).get("revision") == 2 and set(cluster.children(FLOW)) == serving,
                 message="the flow moved to revision 2", timeout=WAIT)
    moved = plan(cluster)
    mark = len(cluster.api.request_log)
    since = len(history(cluster, "deployments"))

    cluster.api.patch("aiflows", FLOW, {"status": None}, NS, subresource="status")  # e.g. a restore without status
    recovered = cluster.wait(lambda: plan(cluster), message="the plan back in status", timeout=WAIT)
    assert recovered["revision"] == 2 and recovered["placement"] == moved["placement"]
    assert "recovered" in recovered["reason"]
    decisions_seen(cluster, 2)  # two more rescheduler turns on the recovered plan
    assert set(cluster.children(FLOW)) == serving
    assert [obj["metadata"]["name"] for _, kind, obj in history(cluster, "deployments")[since:] if kind == "DELETED"] == []
    children = [(r.verb, r.resource, r.name) for r in cluster.operator_writes(mark) if r.resource in ("deployments", "services")]
    assert children == []
    assert cluster.condition(FLOW, "Ready")["status"] == "True"


def test_a_stale_link_measurement_falls_back_to_the_declared_link_and_says_so(tiers):
    cluster = tiers
    cluster.api.start_deployment_controller()
    cluster.api.create(auto_flow(cooldown=3600, links=[{"from": "device", "to": "edge", "bandwidthMbps": 20, "rttMs": 10}]))
    cluster.wait_condition(FLOW, "Ready", "True")
    hop = lambda: next(h for h in status(cluster)["links"] if h["from"] == "device" and h["to"] == "edge")
    cluster.wait(lambda: hop()["source"] == "Measured", message="the fresh measurement in use", timeout=WAIT)
    # The probe's last round towards the edge was 10 minutes ago (it has failed since): it expired.
    publish_links(cluster.api, "device-1", "device", THIN_UPLINK, age_s=600)
    cluster.wait(lambda: hop()["source"] == "Declared", message="the declared link instead", timeout=WAIT)
    assert hop()["bandwidthMbps"] == 20.0
    notes = " | ".join(status(cluster)["observations"]["notes"])
    assert "node device-1: link measurement towards edge is stale" in notes and "valid for 180 s" in notes
