"""Where the operator finds the files it reads at run time: the CRD and the model repository.

In a source checkout (and in the operator image, which keeps the same layout) both sit next to the
`operator/` directory; environment variables point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

# operator/aiflow/api/locations.py -> the checkout root
CHECKOUT_ROOT = Path(__file__).resolve().parents[3]


def crd_path() -> Path:
    """The AIFlow CRD file: $AIFLOW_CRD, else crds/aiflow.io_aiflows.yaml of the checkout."""
    return Path(os.environ.get("AIFLOW_CRD") or CHECKOUT_ROOT / "crds" / "aiflow.io_aiflows.yaml")


def model_repo_path() -> Path:
    """The Triton model repository the operator checks models against: $AIFLOW_MODEL_REPO, else
    model_repo/ of the checkout."""
    return Path(os.environ.get("AIFLOW_MODEL_REPO") or CHECKOUT_ROOT / "model_repo")
