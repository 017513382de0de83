"""The bench recorder: every benchmark figure as one JSON line in bench-results/results.jsonl.

    record(name, value, baseline=None, unit="", target=None, higher_is_better=False,
           *, ratio=None, samples=None, note="", test="")

- `value` is the figure, `baseline` the same quantity measured in the same run without cwlite
  (or by the reference tool); the ratio is value / baseline unless the benchmark passes its own
  `ratio` (e.g. the median of per-round ratios, steadier than the ratio of medians).
- `target` applies to the ratio when there is a baseline, else to the value; `higher_is_better`
  says which side of it is met.
- `samples` (optional, the rounds behind a median) are kept for the plots.

The file is appended to; `python -m tests.bench.report` keeps the newest line per name, so one
benchmark re-run updates its own rows. tests/bench/conftest.py offers this as the `bench_record`
fixture (which also fills `test`); tests outside tests/bench (the abuse suite's load test) import it.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Sequence

RESULTS_DIR = Path(os.environ.get("CWLITE_BENCH_RESULTS", Path(__file__).resolve().parents[2] / "bench-results"))
RESULTS = RESULTS_DIR / "results.jsonl"


def met(ratio_or_value: float, target: float | None, higher_is_better: bool) -> bool | None:
    """Whether a figure meets its target (None when it has none)."""
    if target is None:
        return None
    return ratio_or_value >= target if higher_is_better else ratio_or_value <= target


def record(name: str, value: float, baseline: float | None = None, unit: str = "", target: float | None = None,
           higher_is_better: bool = False, *, ratio: float | None = None, samples: Sequence[float] | None = None,
           note: str = "", test: str = "") -> dict:
    """Append one figure to bench-results/results.jsonl and return the row written."""
    if not math.isfinite(value):
        raise ValueError(f"bench figure {name!r}: value {value!r} is not finite")
    if ratio is None and baseline:
        ratio = value / baseline
    judged = ratio if ratio is not None else value
    row = {"name": name, "value": value, "baseline": baseline, "unit": unit, "ratio": ratio, "target": target,
           "higher_is_better": higher_is_better, "met": met(judged, target, higher_is_better),
           "samples": list(samples) if samples is not None else None, "note": note, "test": test,
           "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    return row


def latest(path: Path = RESULTS) -> list[dict]:
    """The newest row per figure name, in the order the names first appeared."""
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["name"]] = row
    return list(rows.values())
