"""metrics.k8s.io on the emulated API server: absent until metrics-server is "installed"."""

import json
import urllib.error
import urllib.request


def get(apiserver, path):
    with urllib.request.urlopen(apiserver.url + path, timeout=10) as response:
        return json.loads(response.read())


def test_node_metrics_are_served_only_once_registered(apiserver):
    try:
        get(apiserver, "/apis/metrics.k8s.io/v1beta1")
        raise AssertionError("metrics.k8s.io served without metrics-server")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    apiserver.serve_node_metrics()
    apiserver.set_node_metrics("edge-1", "1500m", "2Gi")
    apiserver.set_node_metrics("edge-1", "250m", "2Gi")  # a later sample replaces the first
    discovery = get(apiserver, "/apis/metrics.k8s.io/v1beta1")
    assert [(r["name"], r["kind"], r["verbs"]) for r in discovery["resources"]] == [("nodes", "NodeMetrics", ["get", "list"])]
    (item,) = get(apiserver, "/apis/metrics.k8s.io/v1beta1/nodes")["items"]
    assert item["kind"] == "NodeMetrics" and item["usage"] == {"cpu": "250m", "memory": "2Gi"}
    assert get(apiserver, "/apis/metrics.k8s.io/v1beta1/nodes/edge-1")["metadata"]["name"] == "edge-1"
