"""Owns the curated store: WebDataset tar shards + manifest, per-shard decoded views; the only code writing them.

Layout of artifacts/curated/ (one generation: each run builds the next one beside it and swaps it in whole,
see mmkd.data.generation; files a run keeps are hard links shared with the previous generation):
  shards/<split>-NNNNN.tar    `<key>.png|jpg`, `<key>.txt`, `<key>.json` (open_clip_train reads these directly)
  shards/sizes.json           rows per shard (open_clip_train's convention)
  decoded/<S>/<split>-NNNNN.npy  uint8 [n, S, S, 3] per size S of curate.decoded_sizes: the fast path models read
  thumbs/<split>-NNNNN.npy    uint8 [n, 32, 32] grayscale thumbnails: near-duplicate state for incremental runs
  manifest.jsonl              one line per kept record: provenance, shard, row, byte offset, hashes
  quarantine.jsonl            one line per refused record: source, line, reason, the raw record
  summary.json                counts, and the configuration fingerprint that decides reuse
  checksums.json              size, rows and blake2b of every other file (mmkd.data.checksums), written last
Keys are content hashes of the decoded pixels. Shards are never rewritten: new records go to new shards.
Readers check the cheap part (files exist, sizes and row counts agree) on every open; verify_store hashes.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmkd.data import checksums
from mmkd.data.generation import resolve
from mmkd.data.imaging import square_view
from mmkd.data.index import THUMB
from mmkd.data.manifest import read_manifest
from mmkd.data.split_table import shard_counts
from mmkd.data.splits import SPLITS


class CurationError(RuntimeError):
    """Curation produced nothing usable, or the curated store is inconsistent."""


class NpyAppender:
    """Rows appended to a .npy file whose header is rewritten with the final count at close (no RAM growth)."""

    HEADER = 128

    def __init__(self, path: Path, row_shape: tuple[int, ...], durable: bool = True):
        self.path, self.row_shape, self.n, self.durable = Path(path), tuple(row_shape), 0, durable
        self.fh = open(self.path, "wb")
        self.hash = checksums.hasher()  # of the rows: the header changes at close (see mmkd.data.checksums)
        self._header()

    def _header(self) -> None:
        d = repr({"descr": "|u1", "fortran_order": False, "shape": (self.n, *self.row_shape)})
        body = d.encode("latin1")
        pad = self.HEADER - 10 - len(body) - 1
        self.fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", self.HEADER - 10) + body + b" " * pad + b"\n")

    def append(self, row: np.ndarray) -> None:
        data = np.ascontiguousarray(row, np.uint8).tobytes()
        self.fh.write(data)
        self.hash.update(data)
        self.n += 1

    def close(self) -> dict:
        """Finish the file (flushed to disk) and return its checksums entry."""
        self.fh.seek(0)
        self._header()
        size = self.fh.seek(0, os.SEEK_END)
        self.fh.flush()
        if self.durable:
            os.fsync(self.fh.fileno())
        self.fh.close()
        return {"size": size, "rows": self.n, "blake2b": self.hash.hexdigest(), "hashed_from": self.HEADER}


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (ustar header + data + padding) as bytes: built in the decoding workers, so the curating
    process only appends bytes to the shard."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


def sample_members(key: str, payload: bytes, ext: str, caption: str) -> tuple[bytes, int]:
    """The image and caption members of one sample, and where the image data starts within them."""
    image = tar_member(f"{key}.{ext}", payload)
    return image + tar_member(f"{key}.txt", caption.encode("utf-8")), len(image) - len(payload) - (-len(payload) % 512)


class ShardWriter:
    """Writes one split's shards, rolling over at a byte or record bound; names are <split>-NNNNN."""

    def __init__(self, root: Path, split: str, start: int, max_bytes: int, max_records: int, sizes: list[int],
                 durable: bool = True):
        self.root, self.split, self.index, self.durable = Path(root), split, start, durable
        self.max_bytes, self.max_records, self.sizes = max_bytes, max_records, sizes
        self.tar = None
        self.written: list[str] = []
        self.checksums: dict[str, dict] = {}  # relative path -> checksums.json entry, of every closed shard file

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"

    def _open(self) -> None:
        for sub in ("shards", "thumbs", *(f"decoded/{s}" for s in self.sizes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / "shards" / f"{self.name}.tar.tmp"
        self.tar = open(self.tmp, "wb")
        self.tar_hash = checksums.hasher()
        self.offset = self.rows = 0
        self.views = {s: NpyAppender(self.root / "decoded" / str(s) / f"{self.name}.npy.tmp", (s, s, 3), self.durable)
                      for s in self.sizes}
        self.thumbs = NpyAppender(self.root / "thumbs" / f"{self.name}.npy.tmp", (THUMB, THUMB), self.durable)

    def add(self, key: str, members: bytes, image_at: int, size: int, ext: str, meta: dict, views: dict, thumb) -> dict:
        """Append one sample: its prebuilt image+caption members (sample_members), then its metadata member."""
        if self.tar is None:
            self._open()
        blob = members + tar_member(f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        self.tar.write(blob)
        self.tar_hash.update(blob)
        loc = {"shard": self.name, "row": self.rows, "offset": self.offset + image_at, "size": size, "ext": ext}
        self.offset += len(blob)
        for s, appender in self.views.items():
            appender.append(views[s])
        self.thumbs.append(thumb)
        self.rows += 1
        if self.rows >= self.max_records or self.offset >= self.max_bytes:
            self.close()
        return loc

    def close(self) -> None:
        if self.tar is None:
            return
        end = self.offset + 2 * 512  # two zero blocks end the archive; tar pads to 10 KiB records, as tarfile does
        pad = b"\0" * (end - self.offset + (-end % tarfile.RECORDSIZE))
        self.tar.write(pad)
        self.tar_hash.update(pad)
        self.tar.flush()
        if self.durable:
            os.fsync(self.tar.fileno())  # the generation is switched in after this: its bytes must be on disk first
        self.tar.close()
        for appender in (*self.views.values(), self.thumbs):
            self.checksums[self._rel(appender.path)] = appender.close()
            os.replace(appender.path, appender.path.with_suffix(""))  # drop .tmp: visible only when whole
        os.replace(self.tmp, self.tmp.with_suffix(""))
        self.checksums[self._rel(self.tmp)] = {"size": self.offset + len(pad), "rows": self.rows,
                                               "blake2b": self.tar_hash.hexdigest()}
        self.written.append(self.name)
        self.tar, self.index = None, self.index + 1


    def _rel(self, tmp: Path) -> str:
        return tmp.with_suffix("").relative_to(self.root).as_posix()


def shard_numbers(curated_dir: Path, split: str) -> list[int]:
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in (Path(curated_dir) / "shards").glob(f"{split}-*.tar"))


def remove_unlisted(curated_dir: Path, listed: set[str]) -> list[str]:
    """Delete shard files (and their views) that no manifest line points at: leftovers of an interrupted run."""
    gone = []
    for sub, pattern in (("shards", "*.tar*"), ("decoded", "*/*.npy*"), ("thumbs", "*.npy*")):  # sizes.json stays
        for p in (Path(curated_dir) / sub).glob(pattern):
            if p.name.split(".")[0] not in listed or p.name.endswith(".tmp"):
                p.unlink()
                gone.append(p.relative_to(curated_dir).as_posix())
    return gone


# ------------------------------------------------------------------ reading


class SplitImages:
    """One split's images as a lazily concatenated array over per-shard decoded views (memory-mapped).

    Supports len, .shape, and indexing by int, slice or index array, returning uint8 [n, S, S, 3] numpy.
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        row = parts[0].shape[1:] if parts else (0, 0, 3)
        self.shape = (int(self.starts[-1]), *row)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.fetch(int(p), rows[sel] - self.starts[p])
        return out

    def fetch(self, part: int, rows: np.ndarray) -> np.ndarray:
        return self.parts[part][rows]

    def release(self) -> None:
        """Drop this process's resident pages of the memory-mapped views (they stay in the page cache): an
        epoch over a corpus 10x larger then does not show as 10x RSS."""
        for p in self.parts:
            mm = getattr(p, "_mmap", None)
            if mm is not None:
                mm.madvise(mmap.MADV_DONTNEED)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._rows(np.array([idx if idx >= 0 else len(self) + idx]))[0]
        if isinstance(idx, slice):
            return self._rows(np.arange(len(self))[idx])
        return self._rows(np.asarray(idx, dtype=np.int64))

    def subset(self, rows) -> "Subset":
        return Subset(self, np.asarray(rows, dtype=np.int64))


class Subset:
    """A row selection of SplitImages that is still lazy (a teacher's modalities, say)."""

    def __init__(self, base: SplitImages, rows: np.ndarray):
        self.base, self.rows = base, rows
        self.shape = (len(rows), *base.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        return self.base[self.rows[idx]]

    def release(self) -> None:
        self.base.release()


class ShardImages(SplitImages):
    """The same interface decoding straight from the tar shards at `size` (no decoded view needed)."""

    def __init__(self, curated_dir: Path, records: list[dict], size: int):
        self.dir, self.size = Path(curated_dir), size
        self.records = records
        self.starts = np.array([0, len(records)])
        self.shape = (len(records), size, size, 3)
        # opened now, like the memory-mapped views: a later curation run switching in a new generation (whose
        # shards may reuse these names) cannot change what this object reads
        names = getattr(records, "shard_names", None) or {r["shard"] for r in records}  # a SplitTable knows them
        self.fds = {s: os.open(self.dir / "shards" / f"{s}.tar", os.O_RDONLY) for s in names}

    def __del__(self):
        for fd in getattr(self, "fds", {}).values():
            os.close(fd)

    def fetch(self, part: int, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        for i, r in enumerate(rows):
            rec = self.records[int(r)]
            data = os.pread(self.fds[rec["shard"]], rec["size"], rec["offset"])
            with Image.open(io.BytesIO(data)) as im:
                out[i] = square_view(np.asarray(im.convert("RGB")), self.size)
        return out


def manifest_path(curated_dir: Path) -> Path:
    """The live manifest, checked cheaply: it exists and has the size checksums.json recorded."""
    curated_dir = resolve(curated_dir)
    path = curated_dir / "manifest.jsonl"
    if not path.exists():
        read_manifest(path)  # raises the manifest-not-found error
    want = (checksums.load(curated_dir) or {}).get("manifest.jsonl")
    if want is not None and path.stat().st_size != want["size"]:
        raise CurationError(f"{path}: {path.stat().st_size} bytes, {checksums.NAME} says {want['size']}: the "
                            "store is damaged; run `mmkd verify`, then curate again")
    return path


def split_records(curated_dir: Path, split: str, fields: tuple[str, ...] | None = None) -> list[dict]:
    """Records of one split in shard order; `fields` keeps only those keys (plus shard and row), so a consumer
    of a large corpus holds a few small values per record rather than the whole manifest."""
    path = manifest_path(curated_dir)
    keep = None if fields is None else {*fields, "shard", "row"}
    records = []
    with open(path, encoding="utf-8") as fh:  # streamed: other splits' lines are never all in memory
        for line in fh:
            if line.strip():
                r = json.loads(line)
                if r["split"] == split:
                    records.append(r if keep is None else {k: r.get(k) for k in keep})
    return sorted(records, key=lambda r: (r["shard"], r["row"]))


def load_curated(curated_dir: Path, split: str, size: int | None = None, fields: tuple[str, ...] | None = None):
    """(records, images) of one split at `size` px (square); see open_images and split_records."""
    if split not in SPLITS:
        raise KeyError(f"unknown split '{split}'; splits: {list(SPLITS)}")
    records = split_records(curated_dir, split, fields)
    return records, open_images(curated_dir, records, size)


def open_images(curated_dir: Path, records, size: int | None = None) -> SplitImages:
    """The images of one split's records (a list from split_records, or a SplitTable) at `size` px. They come from
    the decoded views, memory-mapped, when curation wrote that size (size None: the first of curate.decoded_sizes),
    else from the shards. Raises CurationError naming the shard when a file is missing, or its size or rows disagree
    with checksums.json and the manifest."""
    curated_dir = resolve(curated_dir)
    summary = json.loads((curated_dir / "summary.json").read_text())
    decoded = summary.get("decoded_sizes") or []
    if size is None:
        if not decoded:
            raise CurationError(f"{curated_dir}: no decoded views (curate.decoded_sizes is empty); pass a size")
        size = decoded[0]
    counts = shard_counts(curated_dir, records)
    views = size in decoded
    problems = checksums.cheap_problems(curated_dir, counts, [size] if views else [], checksums.load(curated_dir),
                                        (f"decoded {size}",) if views else ("tar",))
    if problems:
        raise CurationError(f"{curated_dir}: {'; '.join(problems[:5])}: the store is damaged; run `mmkd verify`, "
                            "then curate again")
    if not views:
        return ShardImages(curated_dir, records, size)
    return SplitImages([np.load(curated_dir / "decoded" / str(size) / f"{shard}.npy", mmap_mode="r")
                        for shard in counts])


def verify_store(curated_dir: Path) -> list[str]:
    """Every problem of the curated store, each naming its file: missing or unlisted files, size and blake2b
    mismatches against checksums.json, .npy headers, manifest rows past a shard's rows or bytes, decoded and
    thumbnail rows per shard against the manifest, shards/sizes.json. Empty: the store is whole. Reads every byte."""
    curated_dir = resolve(curated_dir)
    if not curated_dir.is_dir():
        return [f"{curated_dir}: no curated store"]
    return [f"{curated_dir}: {p}" for p in checksums.verify(curated_dir)]
