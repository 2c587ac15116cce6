"""Owns the JSONL file format of manifests (raw, curated, quarantine): reading with line-numbered errors, writing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file and line."""


def read_manifest(path: Path) -> list[dict]:
    """Every record of a JSONL file; the first line that is not a JSON object raises ManifestError naming it."""
    return list(iter_manifest(path))


def iter_manifest(path: Path) -> Iterator[dict]:
    """read_manifest one record at a time (memory bounded by one line); the same errors, raised when reached."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    with open(path, encoding="utf-8") as fh:
        for no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}:{no}: invalid JSON: {exc.msg} (col {exc.colno})") from None
            if not isinstance(rec, dict):
                raise ManifestError(f"{path}:{no}: expected a JSON object, got {type(rec).__name__}")
            yield rec


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
            n += 1
    return n
