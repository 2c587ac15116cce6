"""Owns the curated store's checksums.json and its checks: size, rows and blake2b of every file of a generation.

checksums.json, written last into each generation: {"algorithm": "blake2b-128", "files": {relative path:
{"size", "blake2b", and for shard files "rows"}}}. Hashes are computed while the bytes are written (shards,
views, thumbs, metadata), never by reading a file back; a file hard-linked from the previous generation keeps
its entry. A .npy view's header is rewritten with the row count at close, so its hash covers the rows only
(`hashed_from`: the header length) and the header is checked by parsing it (shape and rows).
The cheap check (existence, sizes, row counts) runs whenever the store is opened; `verify` adds the hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

NAME = "checksums.json"
ALGORITHM = "blake2b-128"
MAX_ROW_PROBLEMS = 20


def hasher():
    return hashlib.blake2b(digest_size=16)


def entry(data: bytes) -> dict:
    return {"size": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}


def file_entry(path: Path, rows: int | None = None) -> dict:
    """The entry of a file already on disk (a store written before checksums existed): reads it once."""
    start = npy_header_len(path) if path.suffix == ".npy" else 0
    out = {"size": path.stat().st_size, "blake2b": digest(path, start)}
    if start:
        out["hashed_from"] = start
    if rows is not None:
        out["rows"] = rows
    return out


def digest(path: Path, start: int = 0) -> str:
    h = hasher()
    with open(path, "rb") as fh:
        fh.seek(start)
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HashedText:
    """A text file written line by line, with the size and hash of what was written (manifest, quarantine)."""

    def __init__(self, path: Path, durable: bool = True):
        self.fh, self.h, self.size, self.durable = open(path, "wb"), hasher(), 0, durable

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        self.fh.write(data)
        self.h.update(data)
        self.size += len(data)

    def close(self) -> dict:
        if not self.fh.closed:
            self.fh.flush()
            if self.durable:
                os.fsync(self.fh.fileno())
            self.fh.close()
        return {"size": self.size, "blake2b": self.h.hexdigest()}


def load(curated_dir: Path) -> dict[str, dict] | None:
    """The files table of a generation; None for a store written before checksums existed."""
    path = Path(curated_dir) / NAME
    if not path.exists():
        return None
    return json.loads(path.read_text())["files"]


def dump(files: dict[str, dict]) -> bytes:
    return json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}, indent=1,
                      sort_keys=True).encode()


def npy_header_len(path: Path) -> int:
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        return fh.tell()


def npy_rows(path: Path) -> int:
    """Rows of a .npy file, from its header alone."""
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        shape, _, _ = np.lib.format.read_array_header_1_0(fh)
        return shape[0]


def shard_files(shard: str, sizes: list[int]) -> dict[str, str]:
    """Kind -> relative path of every file of one shard."""
    return {"tar": f"shards/{shard}.tar", "thumbs": f"thumbs/{shard}.npy",
            **{f"decoded {s}": f"decoded/{s}/{shard}.npy" for s in sizes}}


def cheap_problems(curated_dir: Path, counts: dict[str, int], sizes: list[int], files: dict | None,
                   kinds: tuple[str, ...] | None = None) -> list[str]:
    """Existence, size against checksums.json and rows against the manifest of the named shards' files
    (counts: shard -> manifest rows); a stat and a 128-byte header read per file."""
    problems = []
    for shard, n in counts.items():
        for kind, rel in shard_files(shard, sizes).items():
            if kinds is not None and kind not in kinds:
                continue
            path = Path(curated_dir) / rel
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                problems.append(f"shard {shard}: {rel} is missing")
                continue
            want = (files or {}).get(rel)
            if files is not None and want is None:
                problems.append(f"shard {shard}: {rel} is not in {NAME}")
            elif want is not None and size != want["size"]:
                problems.append(f"shard {shard}: {rel} has {size} bytes, {NAME} says {want['size']}")
            elif want is not None and want.get("rows", n) != n:
                problems.append(f"shard {shard}: {rel} holds {want['rows']} rows ({NAME}), the manifest {n}")
            elif path.suffix == ".npy":
                try:
                    rows = npy_rows(path)
                except (ValueError, OSError) as exc:
                    problems.append(f"shard {shard}: {rel} has an unreadable header ({exc})")
                    continue
                if rows != n:
                    problems.append(f"shard {shard}: {rel} has {rows} rows, the manifest {n}")
    return problems


def verify(curated_dir: Path) -> list[str]:
    """Every problem of a curated generation, each naming its file: see mmkd.data.store.verify_store."""
    d = Path(curated_dir)
    problems = [f"{name} is missing" for name in ("manifest.jsonl", "summary.json", NAME, "shards/sizes.json")
                if not (d / name).is_file()]
    if problems:
        return problems
    files = load(d)
    sizes = json.loads((d / "summary.json").read_text()).get("decoded_sizes") or []
    for rel, want in files.items():
        path = d / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{rel}: size mismatch: {size} bytes, {NAME} says {want['size']}")
            continue
        start = want.get("hashed_from", 0)
        if digest(path, start) != want["blake2b"]:
            problems.append(f"{rel}: checksum mismatch (blake2b of bytes {start}..{size})")
        if path.suffix == ".npy" and "rows" in want:
            try:
                if npy_header_len(path) != start or npy_rows(path) != want["rows"]:
                    problems.append(f"{rel}: header does not say {want['rows']} rows")
            except (ValueError, OSError) as exc:
                problems.append(f"{rel}: unreadable .npy header ({exc})")
    for sub, pattern in (("shards", "*.tar*"), ("decoded", "*/*.npy*"), ("thumbs", "*.npy*")):
        for path in sorted((d / sub).glob(pattern)):
            if path.relative_to(d).as_posix() not in files:
                problems.append(f"{path.relative_to(d).as_posix()}: not listed in {NAME}")
    counts, row_problems = Counter(), []
    with open(d / "manifest.jsonl", encoding="utf-8") as fh:
        for no, line in enumerate(fh, start=1):
            try:
                r = json.loads(line)
                shard, row, end = r["shard"], int(r["row"]), int(r["offset"]) + int(r["size"])
            except (ValueError, KeyError, TypeError) as exc:
                row_problems.append(f"manifest.jsonl:{no}: unreadable row ({exc})")
                continue
            counts[shard] += 1
            tar = files.get(f"shards/{shard}.tar")
            if tar is None:
                row_problems.append(f"manifest.jsonl:{no}: shard {shard} is not in the store")
            elif row >= tar.get("rows", 0) or row < 0:
                row_problems.append(f"manifest.jsonl:{no}: row {row} is past the {tar.get('rows', 0)} rows of "
                                    f"shards/{shard}.tar")
            elif end > tar["size"]:
                row_problems.append(f"manifest.jsonl:{no}: bytes up to {end} are past the end of shards/{shard}.tar")
    problems += row_problems[:MAX_ROW_PROBLEMS]
    if len(row_problems) > MAX_ROW_PROBLEMS:
        problems.append(f"... and {len(row_problems) - MAX_ROW_PROBLEMS} more manifest rows with problems")
    for shard, n in sorted(counts.items()):
        for kind, rel in shard_files(shard, sizes).items():
            rows = files.get(rel, {}).get("rows")
            if rows is not None and rows != n:
                problems.append(f"{rel}: {rows} {'decoded ' if kind.startswith('decoded') else ''}rows, the manifest "
                                f"lists {n} for shard {shard}")
    listed = json.loads((d / "shards" / "sizes.json").read_text())
    if listed != {f"{s}.tar": n for s, n in sorted(counts.items())}:
        problems.append("shards/sizes.json does not match the manifest's rows per shard")
    return problems
