"""Owns data arrival: finding the drops in the inbox and adding each to the inbox source under data/.

A drop is a folder put in the inbox (`inbox.dir`) holding `manifest.jsonl` or `manifest.csv` (the manifest
source's columns: image, caption, and optionally id, modality, split, group, labels, licence) and the images
it names, by paths relative to the folder. Write the manifest last (or move the finished folder in): a folder
without one is an incomplete drop and waits.

Ingesting a drop copies its files to `data/<source folder>/<drop id>/`, appends its rows to the inbox source's
manifest (`data/inbox/manifest.jsonl`) with image paths rewritten to that folder and the drop recorded on every
row (`inbox_drop`, `inbox_line`), then moves the drop to `inbox/processed/<drop id>`. Rows are not judged here:
curation checks every record and quarantines a bad one with its reason, as for any source; a line that is not
valid JSON is appended as it is, so curation quarantines it too. Nothing of a drop is lost.

The drop id is the folder name plus a hash of the drop's files (names and contents): the same files are ingested
once however often, and under whatever folder name, they are put in the inbox; a crash between the copy and the
move is repaired by the next ingestion.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")


class InboxError(ValueError):
    """A drop that cannot be ingested at all (no manifest, an unreadable one); it stays in the inbox."""


@dataclass(frozen=True)
class DropPlan:
    """What a drop holds, read without changing anything (a safe thing to cache)."""

    name: str
    path: str
    manifest: str          # the manifest's file name inside the drop
    files: list[str]       # every other file, relative to the drop, sorted
    drop_id: str           # name + content hash
    content_hash: str      # of all file names (relative) and contents: the same files under another name match
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def pending_drops(inbox_dir: Path, processed: str = "processed") -> tuple[list[Path], list[Path]]:
    """(complete drops, incomplete folders) in the inbox, by name; hidden folders and `processed` are skipped."""
    inbox_dir = Path(inbox_dir)
    if not inbox_dir.is_dir():
        return [], []
    ready, waiting = [], []
    for d in sorted(p for p in inbox_dir.iterdir() if p.is_dir()):
        if d.name.startswith(".") or d.name == processed:
            continue
        (ready if any((d / m).is_file() for m in MANIFEST_NAMES) else waiting).append(d)
    return ready, waiting


def drop_state(drop: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file: a cheap key that changes when any file does."""
    drop = Path(drop)
    return sorted((str(f.relative_to(drop)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in drop.rglob("*") if f.is_file())


def plan_drop(drop: Path) -> DropPlan:
    """Hash a drop's files and find its manifest; raises InboxError for a drop without one (or with two)."""
    drop = Path(drop)
    manifests = [m for m in MANIFEST_NAMES if (drop / m).is_file()]
    if len(manifests) != 1:
        raise InboxError(f"drop {drop}: expected one of {MANIFEST_NAMES}, found {manifests or 'none'}")
    h, files, size = hashlib.sha256(), [], 0
    for f in sorted(p for p in drop.rglob("*") if p.is_file()):
        rel = str(f.relative_to(drop))
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        size += f.stat().st_size
        if rel != manifests[0]:
            files.append(rel)
    digest = h.hexdigest()[:12]
    return DropPlan(drop.name, str(drop), manifests[0], files, f"{drop.name}-{digest}", digest, size)


def _rows(manifest: Path) -> list[tuple[int, object]]:
    """(line, row): a dict for each parsed row, the raw text for a JSONL line that does not parse."""
    if manifest.suffix == ".csv":
        try:
            text = manifest.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InboxError(f"{manifest}: not UTF-8 ({exc})") from exc
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, dict(row)) for row in reader]
    out = []
    with open(manifest, "rb") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = raw.rstrip(b"\r\n")
            out.append((line, row))
    return out


def ingested_drops(manifest: Path) -> dict[str, str]:
    """Content hash -> drop id of the drops already in the inbox source's manifest."""
    if not Path(manifest).exists():
        return {}
    ids: dict[str, str] = {}
    with open(manifest, encoding="utf-8", errors="replace") as fh:
        for raw in fh:
            if '"inbox_hash"' in raw:
                try:
                    row = json.loads(raw)
                    ids[row["inbox_hash"]] = row["inbox_drop"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
    return ids


def ingest_drop(plan: DropPlan, source_manifest: Path, processed_dir: Path, image_column: str = "image") -> dict:
    """Copy a planned drop under the source's folder, append its rows, move it to `processed_dir`."""
    drop, source_manifest = Path(plan.path), Path(source_manifest)
    base = source_manifest.parent
    target = base / plan.drop_id
    already = ingested_drops(source_manifest).get(plan.content_hash)  # the drop id it was ingested as
    rows = _rows(drop / plan.manifest)
    if not already:
        if not target.exists():
            staging = base / f".{plan.drop_id}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for rel in plan.files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(drop / rel, staging / rel)
            staging.rename(target)  # the drop's files appear at once, or not at all
        lines = []
        for line, row in rows:
            if isinstance(row, dict):
                row = dict(row)
                if isinstance(row.get(image_column), str):
                    row[image_column] = f"{plan.drop_id}/{row[image_column]}"
                row.update(inbox_drop=plan.drop_id, inbox_hash=plan.content_hash, inbox_line=line)
                lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8"))
            else:  # kept as it came, so curation quarantines it with its reason
                lines.append(row)
        source_manifest.parent.mkdir(parents=True, exist_ok=True)
        with open(source_manifest, "ab") as fh:
            fh.write(b"".join(x + b"\n" for x in lines))
    processed_dir = Path(processed_dir)
    processed_dir.mkdir(parents=True, exist_ok=True)
    dest = processed_dir / plan.drop_id
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(drop), dest)
    return {"drop_id": already or plan.drop_id, "name": plan.name, "rows": len(rows), "files": len(plan.files),
            "bytes": plan.bytes, "already_ingested": bool(already), "processed": str(dest)}
