"""Which container image runs a stage.

An AIFlow may name the image of one stage (`spec.stages[].image`), of every stage of a tier
(`spec.triton.tierImages.<tier>`) or of every stage (`spec.triton.image`); the most specific wins.
A flow that names none gets the operator's default for the stage's tier: the CPU stage image
(images/triton-stage-cpu.Dockerfile) on device and edge, the GPU one (NVIDIA Triton,
images/triton-stage.Dockerfile) on cloud, unless the operator is configured otherwise
(`--stage-image TIER=IMAGE`, or $AIFLOW_STAGE_IMAGES that the chart's `stageImages` values set).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from aiflow import TIERS, __version__

GPU_STAGE_IMAGE = f"ghcr.io/aiflow/triton-stage:{__version__}"
CPU_STAGE_IMAGE = f"ghcr.io/aiflow/triton-stage-cpu:{__version__}"
DEFAULT_TIER_IMAGES = {"device": CPU_STAGE_IMAGE, "edge": CPU_STAGE_IMAGE, "cloud": GPU_STAGE_IMAGE}
STAGE_IMAGES_ENV = "AIFLOW_STAGE_IMAGES"


def parse_tier_images(items: Iterable[str], what: str) -> dict[str, str]:
    """`TIER=IMAGE` items -> {tier: image}; `what` names where they came from in errors."""
    images: dict[str, str] = {}
    for item in items:
        tier, sep, image = item.strip().partition("=")
        tier, image = tier.strip(), image.strip()
        if not sep or not image:
            raise ValueError(f"{what}: {item.strip()!r} is not TIER=IMAGE (e.g. edge={CPU_STAGE_IMAGE})")
        if tier not in TIERS:
            raise ValueError(f"{what}: unknown tier {tier!r} in {item.strip()!r}; choose one of {', '.join(TIERS)}")
        images[tier] = image
    return images


def configured_tier_images(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The operator's default image per tier: the built-in defaults, overridden by
    $AIFLOW_STAGE_IMAGES (`device=IMAGE,edge=IMAGE,cloud=IMAGE`, any subset)."""
    text = environ.get(STAGE_IMAGES_ENV, "")
    items = [i for i in text.split(",") if i.strip()]
    return {**DEFAULT_TIER_IMAGES, **parse_tier_images(items, f"${STAGE_IMAGES_ENV}")}
