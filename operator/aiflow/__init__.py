"""aiflow: split multimodal inference across device, edge and cloud Triton servers."""

__version__ = "0.1.0"

GROUP = "aiflow.io"
VERSION = "v1alpha1"
KIND = "AIFlow"
PLURAL = "aiflows"
TIER_LABEL = "aiflow.io/tier"
TIERS = ("device", "edge", "cloud")
