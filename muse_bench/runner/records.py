"""What a run leaves on disk: versions, ids, timestamps, reading finished stages back, and
publishing the report's leaderboard row."""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from muse_bench import __version__


def versions() -> dict[str, str]:
    """Versions of the harness and its main libraries, for the report."""
    import importlib.metadata as md

    out = {"muse_bench": __version__, "python": platform.python_version()}
    for pkg in (
        "torch",
        "transformers",
        "tokenizers",
        "accelerate",
        "peft",
        "rouge-score",
        "scikit-learn",
        "numpy",
        "vllm",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def leaderboard_path(out: Path, corpus: str) -> Path:
    return out / "leaderboard" / f"{corpus}.csv"


def publish(report: dict[str, Any], out: Path, replace: bool = False) -> Path:
    """Append the report's row to OUT/leaderboard/<corpus>.csv (idempotent by run id).

    `replace` (a --force redo) swaps an existing row of the same run id for the new one,
    in place, so the file never holds two rows of one run nor a stale one.
    """
    from muse_bench.leaderboard.rows import append_row, row_from_report

    path = leaderboard_path(out, report["corpus"])
    append_row(path, row_from_report(report), replace=replace)
    return path


def reuse_report(path: Path, out: Path, publish_row: bool = True) -> dict[str, Any] | None:
    """The report of a finished run, its leaderboard row published again (idempotent,
    unless not `publish_row`), or None when the run has not finished."""
    report = read_json(path)
    if report is not None and publish_row:
        publish(report, out)
    return report


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file's content, or None if it is absent or unreadable (then the stage
    that writes it is redone: a truncated file, a foreign one, an empty one)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
