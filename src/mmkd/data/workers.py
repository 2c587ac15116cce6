"""Owns the decoding worker: one RawRecord in, a checked, hashed and encoded candidate out (no shared state).

Runs in a process pool, so everything costly per record (reading bytes, decoding, hashing, resizing,
PNG encoding, caption scrubbing) happens here, and the curating process only decides and writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from itertools import islice
from pathlib import Path
from multiprocessing import get_context
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from mmkd.data import imaging
from mmkd.data.clean import normalise_caption, resolve_modality, scrub
from mmkd.data.imaging import RecordError
from mmkd.data.index import thumbnail
from mmkd.data.sources import RawRecord, inside, reader
from mmkd.data.sources.files import decode_bytes, raw_bytes
from mmkd.data.splits import SPLITS
from mmkd.data.store import sample_members

_cfg = None
_known: frozenset[str] = frozenset()


def init(cfg, known: frozenset[str]) -> None:
    global _cfg, _known
    _cfg, _known = cfg, known
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # PIL's own bomb guard agrees with ours


@lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime: int) -> str:
    """Whole-file hash, cached by (path, size, mtime): a volume or multi-frame file yields many records."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(rec: RawRecord) -> tuple[str, bytes | None]:
    """Identity of a raw record: its fields plus its raw bytes. Same fingerprint -> same curated output."""
    h = hashlib.blake2b(json.dumps(rec.describe(), sort_keys=True, default=str).encode(), digest_size=16)
    data = None
    try:
        if getattr(reader(rec.kind), "DECODES_BYTES", False):
            data = raw_bytes(rec.loc)
            h.update(data)
        elif "path" in rec.loc:
            st = os.stat(rec.loc["path"])
            h.update(_file_digest(rec.loc["path"], st.st_size, st.st_mtime_ns).encode())
    except (RecordError, OSError):
        h.update(b"\x00unreadable")
    return h.hexdigest(), data


def process(rec: RawRecord) -> dict:
    cfg = _cfg
    # containment is checked here, before any byte is read, not while listing: resolving paths costs syscalls
    if not rec.problem and "root" in rec.loc and inside(Path(rec.loc["root"]), rec.loc["rel"]) is None:
        rec.problem = f"path escapes the source root: {rec.loc['rel']}"
    fp, data = fingerprint(rec) if not rec.problem else (None, None)
    out = {"fingerprint": fp}
    if fp in _known:
        return {**out, "reused": True}
    try:
        if rec.problem:
            raise RecordError(rec.problem)
        caption = normalise_caption(rec.caption or "")
        scrubbed = {}
        if cfg.scrub_captions:
            caption, scrubbed = scrub(caption)
        if len(caption) < cfg.min_caption_chars:
            raise RecordError("empty caption" if not caption else f"caption shorter than {cfg.min_caption_chars} chars")
        if rec.split is not None and rec.split not in SPLITS:
            raise RecordError(f"unknown split '{rec.split}' (expected one of {list(SPLITS)})")
        modality, modality_from = resolve_modality(rec.modality, caption)
        if data is not None:
            rgb = decode_bytes(data, cfg)
        else:
            rgb = reader(rec.kind).load_pixels(rec, cfg)
    except RecordError as exc:
        return {**out, "error": str(exc)}
    except Exception as exc:  # a reader bug or an exotic file must cost one record, not the run
        return {**out, "error": f"unreadable: {type(exc).__name__}: {exc}"}
    stored = imaging.fit_side(rgb, cfg.max_side)
    keep_original = (data is not None and stored is rgb and _plain_original(data))
    gray = bool(np.array_equal(stored[..., 0], stored[..., 1]) and np.array_equal(stored[..., 0], stored[..., 2]))
    if keep_original:
        payload, ext = data, keep_original
    else:  # grey stays one channel: a third of the bytes
        payload, ext = imaging.encode_png(stored[..., 0] if gray else stored), "png"
    phash = imaging.perceptual_hash(rgb)
    thumb = thumbnail(rgb)
    views = {size: imaging.square_view(stored, size) for size in cfg.decoded_sizes}
    key = imaging.content_hash(rgb)
    members, image_at = sample_members(key, payload, ext, caption)
    return {**out, "caption": caption, "scrubbed": scrubbed, "modality": modality, "modality_from": modality_from,
            "hash": key, "phash": phash, "thumb": thumb, "members": members, "image_at": image_at,
            "size": len(payload), "ext": ext,
            "width": stored.shape[1], "height": stored.shape[0], "orig_width": rgb.shape[1],
            "orig_height": rgb.shape[0], "views": views}


def _plain_original(data: bytes) -> str | bool:
    """'png' / 'jpg' when the original bytes decode to exactly the stored pixels (8-bit RGB or gray, upright)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("RGB", "L") or im.getexif().get(0x0112, 1) != 1:
            return False
        return {"PNG": "png", "JPEG": "jpg"}.get(im.format, False)


def _batch(recs: list[RawRecord]) -> list[tuple[RawRecord, dict]]:
    return [(r, process(r)) for r in recs]


def ordered_map(records: Iterable[RawRecord], cfg, known: frozenset[str], workers: int,
                chunk: int = 16) -> Iterator[tuple[RawRecord, dict]]:
    """process() over records in `workers` processes, results in input order, a bounded number in flight."""
    it = iter(records)
    if workers == 0:
        init(cfg, known)
        for rec in it:
            yield rec, process(rec)
        return
    # forkserver, not fork: the caller may be a multi-threaded Prefect worker; the server imports this module
    # once and forks each worker from it, so workers do not pay the imports again (spawn would)
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=(cfg, known)) as pool:
        pending: deque = deque()
        while True:
            batch = list(islice(it, chunk))
            if batch:
                pending.append(pool.submit(_batch, batch))
            if pending and (len(pending) >= workers * 3 or not batch):
                yield from pending.popleft().result()
            if not batch and not pending:
                return
