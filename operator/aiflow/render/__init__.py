"""AIFlow spec + placement -> Kubernetes manifests (pure functions)."""
