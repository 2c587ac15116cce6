"""Owns manifest sources: JSONL and CSV files of (image path, caption, ...) rows, and the embedded corpus.

Column names are configurable (`columns: {caption: title}`); image paths are relative to the manifest's
folder and must stay inside it. A line that is not valid UTF-8 or not valid JSON, or longer than
max_line_bytes (read with a bounded readline, never whole), becomes a quarantined record, never an abort.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from mmkd.config import COLUMN_ROLES
from mmkd.data.sources import RawRecord, inside, source_root, take_metadata
from mmkd.data.sources.files import limit, load_pixels  # noqa: F401  (load_pixels: the reader interface)

DECODES_BYTES = True


def manifest_file(spec, data_root: Path) -> Path:
    root = source_root(spec, data_root)
    if root.is_dir():  # the embedded corpus: data/manifest.jsonl
        root = root / "manifest.jsonl"
    if not root.is_file():
        raise FileNotFoundError(f"source '{spec.name}': manifest {root} not found")
    return root


def iter_records(spec, data_root: Path, limits=None) -> Iterator[RawRecord]:
    path = manifest_file(spec, data_root)
    root = source_root(spec, data_root)
    if root.is_dir() and inside(root, "manifest.jsonl") is None:  # a symlinked manifest pointing outside
        yield RawRecord(spec.name, spec.kind, "manifest.jsonl", "manifest.jsonl",
                        problem="path escapes the source root: manifest.jsonl")
        return
    fmt = spec.format or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
    cols = {role: spec.columns.get(role, role) for role in COLUMN_ROLES}
    cap = limit(limits, "max_line_bytes")
    with open(path, "rb") as fh:
        rows = _csv_rows(fh, path, spec, cap) if fmt == "csv" else _jsonl_rows(fh, cap)
        for line, row, problem in rows:
            try:
                yield _record(spec, path.parent, line, row, problem, cols)
            except Exception as exc:  # one odd line costs its record, never the listing
                yield RawRecord(spec.name, spec.kind, f"line{line}", f"{path.parent.name}:{line}", line=line,
                                raw=row, problem=f"unreadable manifest line {line}: {type(exc).__name__}: {exc}")


def _lines(fh, cap: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, too long) per line, read with a bounded readline: a line over cap bytes is never
    held whole (its first 200 bytes are kept for the quarantine, the rest is skipped in pieces)."""
    line = 0
    while raw := fh.readline(cap + 1):
        line += 1
        if len(raw) <= cap:
            yield line, raw, False
            continue
        end = raw.endswith(b"\n")
        while not end and (rest := fh.readline(1 << 20)):
            end = rest.endswith(b"\n")
        yield line, raw[:200], True


def _too_long(line: int, raw: bytes, cap: int) -> tuple[int, str, str]:
    return (line, raw.decode("utf-8", "backslashreplace") + "...",
            f"manifest line too long: line {line} is over max_line_bytes {cap}")


def _jsonl_rows(fh, cap: int) -> Iterator[tuple[int, object, str | None]]:
    for line, raw, too_long in _lines(fh, cap):
        if too_long:
            yield _too_long(line, raw, cap)
            continue
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


def _csv_rows(fh, path: Path, spec, cap: int) -> Iterator[tuple[int, object, str | None]]:
    long_lines: list[tuple[int, bytes]] = []

    def text_lines():
        for line, raw, too_long in _lines(fh, cap):
            if too_long:  # csv sees a blank line (skipped, line numbers kept); the record is reported below
                long_lines.append((line, raw))
                raw = b"\n"
            yield raw.decode("utf-8", "surrogateescape")

    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(text_lines(), dialect=dialect)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            row = None
        except csv.Error as exc:  # e.g. a field over csv's own field size limit
            row = exc
        while long_lines:
            yield _too_long(*long_lines.pop(0), cap)
        if row is None:
            return
        line = reader.reader.line_num  # DictReader's own line_num lags behind a row that raised
        if isinstance(row, csv.Error):
            yield line, None, f"unparseable CSV row: {row}"
            continue
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
