"""Shared fixtures live in fixture modules next to the tests that own them."""

pytest_plugins = [
    "tests.kube.fixtures",  # emulated Kubernetes API server
    "tests.local.fixtures",  # real tritonserver processes, trained model family
]
