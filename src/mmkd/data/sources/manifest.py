"""Owns manifest sources: JSONL and CSV files of (image path, caption, ...) rows, and the embedded corpus.

Column names are configurable (`columns: {caption: title}`); image paths are relative to the manifest's
folder and must stay inside it. A line that is not valid UTF-8 or not valid JSON becomes a quarantined
record, never an abort.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from mmkd.config import COLUMN_ROLES
from mmkd.data.sources import RawRecord, source_root, take_metadata
from mmkd.data.sources.files import load_pixels  # noqa: F401  (the reader interface)

DECODES_BYTES = True


def manifest_file(spec, data_root: Path) -> Path:
    root = source_root(spec, data_root)
    if root.is_dir():  # the embedded corpus: data/manifest.jsonl
        root = root / "manifest.jsonl"
    if not root.is_file():
        raise FileNotFoundError(f"source '{spec.name}': manifest {root} not found")
    return root


def iter_records(spec, data_root: Path) -> Iterator[RawRecord]:
    path = manifest_file(spec, data_root)
    fmt = spec.format or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
    cols = {role: spec.columns.get(role, role) for role in COLUMN_ROLES}
    rows = _csv_rows(path, spec) if fmt == "csv" else _jsonl_rows(path)
    for line, row, problem in rows:
        yield _record(spec, path.parent, line, row, problem, cols)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object, str | None]]:
    with open(path, "rb") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line, raw.decode("utf-8", "backslashreplace").rstrip("\n"), \
                    f"invalid UTF-8 at byte {exc.start} of the line"
                continue
            try:
                yield line, json.loads(text.rstrip("\r\n")), None
            except json.JSONDecodeError as exc:
                yield line, text.rstrip("\n"), f"invalid JSON: {exc.msg} (col {exc.colno})"


def _csv_rows(path: Path, spec) -> Iterator[tuple[int, object, str | None]]:
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    for row in reader:
        line = reader.line_num
        if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
            yield line, {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                         if isinstance(v, str) else v for k, v in row.items()}, "invalid UTF-8 in the row"
            continue
        if None in row:
            yield line, row, f"more fields than the header ({len(reader.fieldnames or [])} columns)"
            continue
        labels = {c: row[c] for c in spec.label_columns if row.get(c) not in (None, "")}
        yield line, {**row, "__labels__": labels}, None


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _record(spec, root: Path, line: int, row, problem: str | None, cols: dict) -> RawRecord:
    rec = RawRecord(source=spec.name, kind=spec.kind, key=f"line{line}", origin=f"{root.name}:{line}",
                    line=line, raw=row, problem=problem)
    if problem:
        return rec
    if not isinstance(row, dict):
        rec.problem = f"expected a JSON object, got {type(row).__name__}"
        return rec
    get = lambda role: row.get(cols[role])  # noqa: E731
    image, caption = get("image"), get("caption")
    rid = get("id")
    rec.id = str(rid) if isinstance(rid, (str, int)) and str(rid) else None
    for role, value in (("image", image), ("caption", caption)):
        if value is None:
            rec.problem = f"missing field '{cols[role]}'"
            return rec
        if not isinstance(value, str):
            rec.problem = f"field '{cols[role]}' must be a string, got {type(value).__name__}"
            return rec
    labels = row.get("__labels__") if "__labels__" in row else get("labels")
    if labels is not None and not isinstance(labels, dict):
        rec.problem = f"field '{cols['labels']}' must be an object"
        return rec
    rec.caption, rec.labels = caption, dict(labels or {})
    take_metadata(rec, get)
    rec.key = rec.id or image
    rec.origin = image
    # the decoding worker refuses paths that resolve outside root before reading them
    rec.loc = {"path": str(root / image), "rel": image, "root": str(root)}
    return rec
