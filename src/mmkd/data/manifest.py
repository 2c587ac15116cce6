"""Owns the JSONL manifest format: record schema, tolerant reading with line-numbered errors, writing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

REQUIRED = {"id": str, "image": str, "caption": str, "modality": str, "split": str}


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file and line."""


@dataclass
class BadLine:
    line: int
    raw: str
    reason: str
    record_id: str | None = None  # when the line parsed far enough to carry an id


def check_record(rec: object) -> str | None:
    """Why a parsed record is malformed, or None when it is well-formed."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    for key, typ in REQUIRED.items():
        if key not in rec:
            return f"missing field '{key}'"
        if not isinstance(rec[key], typ):
            return f"field '{key}' must be {typ.__name__}, got {type(rec[key]).__name__}"
    if "labels" in rec and not isinstance(rec["labels"], dict):
        return "field 'labels' must be an object"
    return None


def iter_manifest(path: Path) -> Iterator[tuple[int, dict | None, BadLine | None]]:
    """Yield (line_no, record, None) for good lines and (line_no, None, BadLine) for bad ones."""
    with open(path, encoding="utf-8") as fh:
        for no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                yield no, None, BadLine(no, raw.rstrip("\n"), f"invalid JSON: {exc.msg} (col {exc.colno})")
                continue
            reason = check_record(rec)
            if reason:
                rid = rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None
                yield no, None, BadLine(no, raw.rstrip("\n"), reason, rid)
            else:
                yield no, rec, None


def read_manifest(path: Path, strict: bool = True) -> list[dict]:
    """All records; with strict, the first bad line raises ManifestError naming it."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    out = []
    for no, rec, bad in iter_manifest(path):
        if bad is not None:
            if strict:
                raise ManifestError(f"{path}:{no}: {bad.reason}")
            continue
        out.append(rec)
    return out


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
            n += 1
    return n
