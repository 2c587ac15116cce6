"""Owns data arrival: finding the drops in the inbox and adding each to the inbox source under data/.

A drop is a folder put in the inbox (`inbox.dir`) holding `manifest.jsonl` or `manifest.csv` (the manifest
source's columns: image, caption, and optionally id, modality, split, group, labels, licence) and the images
it names, by paths relative to the folder. Write the manifest last (or move the finished folder in): a folder
without one is an incomplete drop and waits. A drop holds regular files and folders only: a drop that is a
symbolic link, or holds one (or a device, a FIFO), is refused with the link named, so that nothing outside the
drop is ever read (and then copied into data/, versioned and pushed).

Ingesting a drop copies its files to `data/<source folder>/<drop id>/` (through a staging folder renamed at once),
then writes the inbox source's manifest (`data/inbox/manifest.jsonl`) anew, whole, with the drop's rows appended
(image paths rewritten to that folder, the drop recorded on every row: `inbox_drop`, `inbox_hash`, `inbox_line`),
then moves the drop to `inbox/processed/<drop id>`. A kill at any point leaves either none or all of a drop's rows,
and its images are in place before its rows; the next ingestion (under the workspace lock) removes what a killed
one left and completes the drop, resuming its copy. Rows are not judged here: curation checks every record and
quarantines a bad one with its reason, as for any source; a line that is not valid JSON is kept as it is, so
curation quarantines it too.

The drop id is the folder name plus a hash of the drop's files (names and contents): the same files are ingested
once however often, and under whatever folder name, they are put in the inbox. The files are hashed again as they
are copied: a drop changed after it was planned is refused this time and ingested on the next run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from mmkd.atomic import fsync_dir, remove_stale_temps, replacing

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
STAGING_SUFFIX = ".partial"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class InboxError(ValueError):
    """A drop that cannot be ingested at all (no manifest, an unreadable one, a link); it stays in the inbox."""


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
    """(complete drops, incomplete folders) in the inbox, by name; hidden folders and `processed` are skipped.
    A link to a folder is listed like a drop, so that planning refuses it with its reason."""
    inbox_dir = Path(inbox_dir)
    if not inbox_dir.is_dir():
        return [], []
    ready, waiting = [], []
    for d in sorted(p for p in inbox_dir.iterdir() if p.is_dir()):
        if d.name.startswith(".") or d.name == processed:
            continue
        (ready if any((d / m).is_file() for m in MANIFEST_NAMES) else waiting).append(d)
    return ready, waiting


def _walk(drop: Path) -> list[tuple[Path, os.stat_result]]:
    """Every regular file under `drop`, by Path order, with its lstat; raises InboxError naming a link or a special
    file. Nothing is followed: a link is reported, never read."""
    drop = Path(drop)
    if drop.is_symlink():
        raise InboxError(f"drop {drop} is a symbolic link (to {os.readlink(drop)}); refused: put the folder itself "
                         "in the inbox")
    out = []
    for folder, dirs, files in os.walk(drop, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            rel = path.relative_to(drop)
            if stat.S_ISLNK(st.st_mode):
                raise InboxError(f"drop {drop}: {rel} is a symbolic link (to {os.readlink(path)}); refused: a drop "
                                 "holds regular files only, nothing outside it is read")
            if stat.S_ISREG(st.st_mode):
                out.append((path, st))
            elif not stat.S_ISDIR(st.st_mode):
                raise InboxError(f"drop {drop}: {rel} is not a regular file (mode {stat.filemode(st.st_mode)}); "
                                 "refused")
    return sorted(out, key=lambda x: x[0])


def drop_state(drop: Path) -> list[tuple[str, int, int, int]]:
    """(relative path, size, mtime_ns) of every entry, links included (never followed): a cheap key that changes
    when any file does."""
    drop = Path(drop)
    if drop.is_symlink():  # planning refuses it; not even its target's listing is read
        return [(".", 0, 0, os.lstat(drop).st_mode)]
    out = []
    for folder, dirs, files in os.walk(drop, followlinks=False):
        for name in dirs + files:
            st = os.lstat(Path(folder) / name)
            if not stat.S_ISDIR(st.st_mode):
                out.append((str((Path(folder) / name).relative_to(drop)), st.st_size, st.st_mtime_ns, st.st_mode))
    return sorted(out)


class _Inside:
    """drop/rel after checking that it resolves inside the drop (a plan may come from a cache: trust nothing);
    each folder is resolved once per ingestion, the last component is opened without following a link."""

    def __init__(self, drop: Path):
        self.drop, self.root = Path(drop), os.path.realpath(drop)
        self.folders: dict[str, bool] = {}

    def __call__(self, rel: str) -> Path:
        folder, name = os.path.split(rel)
        ok = self.folders.get(folder)
        if ok is None:
            real = os.path.realpath(os.path.join(self.root, folder))
            ok = self.folders[folder] = real == self.root or real.startswith(self.root + os.sep)
        if not ok or name in ("", ".", "..") or os.path.isabs(rel):
            raise InboxError(f"drop {self.drop}: {rel} resolves outside the drop; refused")
        return self.drop / rel


def _read(path: Path, drop: Path, rel: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as exc:
        raise InboxError(f"drop {drop}: cannot read {rel} ({exc.strerror}; a link is refused)") from exc
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def plan_drop(drop: Path) -> DropPlan:
    """Hash a drop's files and find its manifest; raises InboxError for a drop without one (or with two), or
    holding a link."""
    drop = Path(drop)
    entries = _walk(drop)
    present = {str(p.relative_to(drop)) for p, _ in entries}
    manifests = [m for m in MANIFEST_NAMES if m in present]
    if len(manifests) != 1:
        raise InboxError(f"drop {drop}: expected one of {MANIFEST_NAMES}, found {manifests or 'none'}")
    h, files, size, inside = hashlib.sha256(), [], 0, _Inside(drop)
    for path, st in entries:
        rel = str(path.relative_to(drop))
        h.update(rel.encode() + b"\0")
        h.update(_read(inside(rel), drop, rel))
        size += st.st_size
        if rel != manifests[0]:
            files.append(rel)
    digest = h.hexdigest()[:12]
    return DropPlan(drop.name, str(drop), manifests[0], files, f"{drop.name}-{digest}", digest, size)


def _rows(data: bytes, name: str) -> list[tuple[int, object]]:
    """(line, row): a dict for each parsed row, the raw text for a JSONL line that does not parse."""
    if name.endswith(".csv"):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InboxError(f"{name}: not UTF-8 ({exc})") from exc
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, dict(row)) for row in reader]
    out = []
    for line, raw in enumerate(io.BytesIO(data), start=1):
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


def _copy_file(data: bytes, dst: Path) -> None:
    """Write one staged file (a file of its own: the staging folder is renamed whole once every file is in), on disk
    before the rename that publishes it: after a power loss no manifest row points at an empty image."""
    with open(dst, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _stage(plan: DropPlan, drop: Path, target: Path) -> bytes:
    """Copy the drop's files to a staging folder, checking them against the plan's hash, and rename it to target;
    returns the manifest's bytes (those hashed). A staging folder an interrupted run left is resumed: a file already
    there with the same bytes is kept, any other rewritten."""
    staging = target.with_name(f".{target.name}{STAGING_SUFFIX}")
    staging.mkdir(parents=True, exist_ok=True)
    h, manifest, inside = hashlib.sha256(), b"", _Inside(drop)
    try:
        for rel in sorted([plan.manifest, *plan.files], key=Path):  # the plan's hashing order
            data = _read(inside(rel), drop, rel)
            h.update(rel.encode() + b"\0")
            h.update(data)
            if rel == plan.manifest:
                manifest = data
                continue
            dst = staging / rel
            if dst.is_file() and dst.stat().st_size == len(data) and dst.read_bytes() == data:
                continue  # copied whole before an interruption
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(data, dst)
        if h.hexdigest()[:12] != plan.content_hash:
            raise InboxError(f"drop {drop} changed after it was planned (hash {h.hexdigest()[:12]}, planned "
                             f"{plan.content_hash}); it stays in the inbox for the next run")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(target)  # the drop's files appear at once, or not at all
    fsync_dir(target.parent)
    return manifest


def _write_manifest(manifest: Path, new: bytes) -> None:
    """Write manifest + new lines to a temp file and rename it over the manifest: all the drop's rows or none."""
    with replacing(manifest) as out:
        if manifest.exists():
            with open(manifest, "rb") as old:
                shutil.copyfileobj(old, out, 1 << 20)
                if out.tell():
                    old.seek(-1, os.SEEK_END)
                    if old.read(1) != b"\n":  # a last line left without its newline: new rows start a line
                        out.write(b"\n")
        out.write(new)


def recover(base: Path, keep: str | None = None) -> list[Path]:
    """Remove what killed ingestions left under the source folder (temp manifests, staging folders but the one of
    drop id `keep`, which is resumed); call with the workspace lock held. Returns what was removed."""
    gone = remove_stale_temps(base)
    for staging in base.glob(f".*{STAGING_SUFFIX}"):
        if staging.name != f".{keep}{STAGING_SUFFIX}":
            shutil.rmtree(staging, ignore_errors=True)
            gone.append(staging)
    return gone


def ingest_drop(plan: DropPlan, source_manifest: Path, processed_dir: Path, image_column: str = "image") -> dict:
    """Copy a planned drop under the source's folder, add its rows, move it to `processed_dir`; the caller holds
    the workspace lock. `recovered`: this run completed a drop whose rows an interrupted run had written."""
    drop, source_manifest = Path(plan.path), Path(source_manifest)
    base = source_manifest.parent
    base.mkdir(parents=True, exist_ok=True)
    recover(base, keep=plan.drop_id)
    target = base / plan.drop_id
    processed_dir = Path(processed_dir)
    already = ingested_drops(source_manifest).get(plan.content_hash)  # the drop id it was ingested as
    # rows in, but the drop never archived: an ingestion killed before its last move, completed now
    recovered = bool(already) and not (processed_dir / already).exists()
    if already:
        rows = _rows(_read(_Inside(drop)(plan.manifest), drop, plan.manifest), plan.manifest)
    else:
        if target.exists():  # renamed whole by an interrupted run: its files are this drop's (same id, same hash)
            data = _read(_Inside(drop)(plan.manifest), drop, plan.manifest)
        else:
            data = _stage(plan, drop, target)
        rows = _rows(data, plan.manifest)
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
        _write_manifest(source_manifest, b"".join(x + b"\n" for x in lines))
    processed_dir.mkdir(parents=True, exist_ok=True)
    dest = processed_dir / plan.drop_id
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(drop), dest)
    return {"drop_id": already or plan.drop_id, "name": plan.name, "rows": len(rows), "files": len(plan.files),
            "bytes": plan.bytes, "already_ingested": bool(already) and not recovered, "recovered": recovered,
            "processed": str(dest)}
