"""Caption quality: BLEU-4, CIDEr, ROUGE-L (pycocoevalcap) and exact match, all on a 0-100 scale."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Quality:
    bleu4: float
    cider: float
    rouge_l: float
    exact_match: float
    count: int

    def as_dict(self) -> dict:
        return asdict(self)


def normalise(caption: str) -> str:
    """Lower case, punctuation dropped, single spaces: what the metrics and exact match compare."""
    return " ".join(re.findall(r"[a-z0-9]+", caption.lower()))


def score(predictions: list[str], references: list[str | list[str]]) -> Quality:
    """Score predicted captions against references (one or several per image)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one reference set per prediction, got {len(predictions)} and {len(references)}")
    refs = {i: [normalise(r) for r in ([r] if isinstance(r, str) else r)] for i, r in enumerate(references)}
    hyps = {i: [normalise(p) or "<empty>"] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    rouge, _ = Rouge().compute_score(refs, hyps)
    exact = sum(hyps[i][0] in refs[i] for i in hyps) / len(hyps)
    return Quality(
        bleu4=100 * float(bleu[3]),
        cider=100 * float(cider),
        rouge_l=100 * float(rouge),
        exact_match=100 * exact,
        count=len(predictions),
    )
