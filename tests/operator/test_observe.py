"""Node load from metrics.k8s.io, read by the operator's API client from the emulated API server."""

from aiflow.controller.kube import KubeApi
from aiflow.controller.observe import node_utilisation, observe_nodes


def test_node_load_from_metrics_server_garbage_and_absence(apiserver):
    api = KubeApi.from_environment(kubeconfig=str(apiserver.kubeconfig))
    apiserver.seed_node("edge-1", "edge", allocatable={"cpu": "4", "memory": "8Gi"})
    apiserver.seed_node("edge-2", "edge", allocatable={"cpu": "4", "memory": "8Gi"})
    apiserver.seed_node("cloud-1", "cloud", allocatable={"cpu": "0", "memory": "8Gi"})
    nodes = observe_nodes(api)
    assert node_utilisation(api, nodes) == ({}, ("node load: metrics.k8s.io is not served (no metrics-server); load counts as 0",))

    apiserver.serve_node_metrics()
    apiserver.set_node_metrics("edge-1", "1500m")
    apiserver.set_node_metrics("edge-2", "lots")  # garbage
    apiserver.set_node_metrics("cloud-1", "1")  # of no allocatable CPU
    apiserver.set_node_metrics("other", "1")  # not a tier node: ignored
    load, notes = node_utilisation(api, nodes)
    assert load == {"edge-1": 0.375}
    assert any("edge-2: usage or allocatable CPU is not a quantity" in n for n in notes)
    assert any("cloud-1: CPU usage 1 of 0 makes no sense" in n for n in notes)

    apiserver.handler["get /apis/metrics.k8s.io/v1beta1/nodes"] << 500  # noqa: B015  (kmock's DSL)
    load, (note,) = node_utilisation(api, nodes)
    assert load == {} and "metrics.k8s.io failed" in note and "500" in note
