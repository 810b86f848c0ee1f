"""Fixtures: an emulated Kubernetes API server."""
