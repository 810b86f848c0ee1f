"""Fixtures: real tritonserver processes and the trained captioner family."""
