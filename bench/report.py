"""What every benchmark writes: a CSV of its rows (the tables it prints come from the same rows).

Benchmarks run as `python bench/<name>.py` and as `python -m bench.<name>`; each puts the checkout
root on `sys.path` first so `from bench.report import write_csv` works both ways.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path


def write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str] | None = None) -> Path:
    """Write `rows` to `path` (parents made) with `columns` (default: the first row's keys);
    keys outside `columns` are left out. Returns the path."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0]) if rows else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
