"""Owns the decoding worker: one RawRecord in, a checked, hashed and encoded candidate out (no shared state).

Runs in a process pool, so everything costly per record (reading bytes, decoding, hashing, resizing,
PNG encoding, caption scrubbing) happens here, and the curating process only decides and writes. Each record
is checked against the validation contract (mmkd.data.contract) here, so curation keeps nothing validation
refuses. A worker that dies costs only the record that killed it: see ordered_map.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from itertools import islice
from pathlib import Path
from multiprocessing import get_context
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from mmkd.data import contract, guard, imaging
from mmkd.data.clean import normalise_caption, resolve_modality, scrub
from mmkd.data.imaging import RecordError
from mmkd.data.index import thumbnail
from mmkd.data.sources import READERS, RawRecord, inside, reader
from mmkd.data.sources.files import decode_bytes, raw_bytes
from mmkd.data.splits import SPLITS
from mmkd.data.store import sample_members

log = logging.getLogger("mmkd")
# imported lazily by the first decode (np.median pulls numpy.ma: 0.2 s; PIL's common formats 0.1 s): imported once in
# the forkserver instead, so a fresh worker (a replaced pool, a record decoded alone) starts warm
PRELOAD = ("numpy.ma", "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.JpegImagePlugin", "PIL.PngImagePlugin",
           "PIL.PpmImagePlugin")
# what curate() decodes records with: (records, cfg, known fingerprints, workers) -> (record, candidate) in input
# order; ordered_map below (local processes) or mmkd.data.curate_dask.decoder (a Dask cluster)
Decoder = Callable[[Iterable[RawRecord], object, frozenset, int], Iterator[tuple[RawRecord, dict]]]
_cfg = None
_known: frozenset[str] = frozenset()
_rules: list = []


def init(cfg, known: frozenset[str], readers: dict[str, str] | None = None) -> None:
    global _cfg, _known, _rules
    _cfg, _known, _rules = cfg, known, contract.manifest_rules(cfg)
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # PIL's own bomb guard agrees with ours
    READERS.update(readers or {})  # kinds the caller registered at run time: a worker imports modules afresh


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
            data = raw_bytes(rec.loc, _cfg.max_file_bytes if _cfg is not None else None)
            h.update(data)
        elif "path" in rec.loc:
            st = os.stat(rec.loc["path"])
            h.update(_file_digest(rec.loc["path"], st.st_size, st.st_mtime_ns).encode())
    except (RecordError, OSError):
        h.update(b"\x00unreadable")
    return h.hexdigest(), data


def process(rec: RawRecord, started=None) -> dict:
    """One record in, its candidate out; `started(fingerprint)` is called before decoding (crash attribution)."""
    cfg = _cfg
    # containment is checked here, before any byte is read, not while listing: resolving paths costs syscalls
    if not rec.problem and "root" in rec.loc and inside(Path(rec.loc["root"]), rec.loc["rel"]) is None:
        rec.problem = f"path escapes the source root: {rec.loc['rel']}"
    fp, data = fingerprint(rec) if not rec.problem else (None, None)
    out = {"fingerprint": fp}
    if fp in _known:
        return {**out, "reused": True}
    if started is not None:
        started(fp)
    try:
        if rec.problem:
            raise RecordError(rec.problem)
        return {**out, **_candidate(rec, data, cfg)}
    except RecordError as exc:
        return {**out, "error": str(exc)}
    except Exception as exc:  # a reader bug or an exotic file must cost one record, not the run
        return {**out, "error": f"unreadable: {type(exc).__name__}: {exc}"}


def _candidate(rec: RawRecord, data: bytes | None, cfg) -> dict:
    caption = normalise_caption(rec.caption or "")
    scrubbed = {}
    if cfg.scrub_captions:
        caption, scrubbed = scrub(caption)
    contract.check_caption(caption, cfg)
    if rec.split is not None and rec.split not in SPLITS:
        raise RecordError(f"unknown split '{rec.split}' (expected one of {list(SPLITS)})")
    modality, modality_from = resolve_modality(rec.modality, caption)
    rgb = decode_bytes(data, cfg) if data is not None else reader(rec.kind).load_pixels(rec, cfg)
    stored = imaging.fit_side(rgb, cfg.max_side)
    contract.check_stored(stored, rgb.shape, cfg)
    row = {"caption": caption, "modality": modality, "width": stored.shape[1], "height": stored.shape[0],
           "source": rec.source}
    broken = contract.row_violation(row, _rules)  # the backstop: every per-row rule of validation, on this row
    if broken is not None:
        raise RecordError(f"fails validation rule: {broken.describe()} (got {row[broken.column]!r:.80})")
    keep_original = (data is not None and stored is rgb and _plain_original(data))
    gray = bool(np.array_equal(stored[..., 0], stored[..., 1]) and np.array_equal(stored[..., 0], stored[..., 2]))
    if keep_original:
        payload, ext = data, keep_original
    else:  # grey stays one channel: a third of the bytes
        payload, ext = imaging.encode_png(stored[..., 0] if gray else stored), "png"
    key = imaging.content_hash(rgb)
    members, image_at = sample_members(key, payload, ext, caption)
    return {"caption": caption, "scrubbed": scrubbed, "modality": modality, "modality_from": modality_from,
            "hash": key, "phash": imaging.perceptual_hash(rgb), "thumb": thumbnail(rgb), "members": members,
            "image_at": image_at, "size": len(payload), "ext": ext, "width": stored.shape[1],
            "height": stored.shape[0], "orig_width": rgb.shape[1], "orig_height": rgb.shape[0],
            "views": {size: imaging.square_view(stored, size) for size in cfg.decoded_sizes}}


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
    """process() over records in `workers` processes, results in input order, a bounded number in flight.

    A worker that dies (a segfault in a C decoder, the OOM killer) costs no record: the pool is replaced and the
    records in flight are decoded again, each in a process of its own (up to `workers` at once); a record that
    kills two of those is quarantined as a decoder crash naming the signal. Results stay in input order and
    equal to a run without the death. Refuses (guard.MainGuardError) a main script without a `__main__` guard."""
    it = iter(records)
    if workers == 0:
        init(cfg, known)
        for rec in it:
            yield rec, process(rec)
        return
    guard.check_main_guard()
    # forkserver, not fork: the caller may be a multi-threaded Prefect worker; the server imports this module
    # once and forks each worker from it, so workers do not pay the imports again (spawn would)
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([__name__, *PRELOAD])
    initargs = (cfg, known, dict(READERS))
    pool, pending = None, deque()  # pending: (batch, future) in input order
    try:
        while True:
            if pool is None:
                pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=initargs)
            batch = list(islice(it, chunk))
            if batch:
                try:
                    pending.append((batch, pool.submit(_batch, batch)))
                except BrokenProcessPool:  # broke since the last result: the batch is retried with the others
                    pending.append((batch, None))
            if pending and (len(pending) >= workers * 3 or not batch):
                head, fut = pending[0]
                try:
                    results = fut.result() if fut is not None else None
                except BrokenProcessPool:
                    results = None
                except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result: retry this batch alone
                    log.warning("curate: a decoding batch failed (%s: %s); decoding its %d records one by one",
                                type(exc).__name__, exc, len(head))
                    pending.popleft()
                    yield from zip(head, isolated(head, ctx, initargs, workers))
                    continue
                if results is None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = None
                    yield from _recover(pending, ctx, initargs, workers)
                    continue
                pending.popleft()
                yield from results
            if not batch and not pending:
                return
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _recover(pending: deque, ctx, initargs, workers: int) -> Iterator[tuple[RawRecord, dict]]:
    """After a worker died: the results that came back, and every record still in flight decoded alone, in order."""
    entries = []
    while pending:
        batch, fut = pending.popleft()
        ok = fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None
        entries.append((batch, fut.result() if ok else None))
    suspects = [rec for batch, results in entries if results is None for rec in batch]
    log.warning("curate: a decoding worker died; decoding its %d in-flight records again, each in a process of "
                "its own", len(suspects))
    alone = iter(isolated(suspects, ctx, initargs, workers))
    for batch, results in entries:
        yield from results if results is not None else ((rec, next(alone)) for rec in batch)


def isolated(recs: list[RawRecord], ctx, initargs, workers: int) -> list[dict]:
    """process() on each record alone: `workers` processes, each holding one record at a time, so a death is that
    one record's doing; a record that kills two of them is quarantined as a decoder crash."""
    results: list[dict | None] = [None] * len(recs)
    todo, deaths, slots = deque(range(len(recs))), [0] * len(recs), {}  # conn -> [process, index, ready, fp]
    try:
        while todo or any(s[1] is not None for s in slots.values()):
            while len(slots) < min(workers, len(todo) + sum(s[1] is not None for s in slots.values())):
                conn, child_end = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(initargs, child_end), daemon=True)
                proc.start()
                child_end.close()  # the child's end only: the pipe reads EOF exactly when the child is gone
                slots[conn] = [proc, None, False, None]
            for conn, slot in slots.items():
                if slot[2] and slot[1] is None and todo:
                    try:
                        conn.send(recs[todo[0]])
                    except OSError:  # it died idle (its EOF is read below): the record goes to another
                        continue
                    slot[1], slot[3] = todo.popleft(), None
            for conn in wait(list(slots)):
                proc, i, ready, fp = slot = slots[conn]
                try:
                    kind, value = conn.recv()
                except EOFError:  # the process is gone
                    conn.close()
                    proc.join()
                    del slots[conn]
                    if not ready:  # it died before it could take a record: the environment is broken, not a record
                        raise RuntimeError(f"a decoding worker exited (code {proc.exitcode}) while it started (its "
                                           f"error is above). {guard.ADVICE}") from None
                    if i is not None:
                        deaths[i] += 1  # once may be chance (the OOM killer picks any process); twice is the record
                        if deaths[i] < 2:
                            todo.append(i)
                        else:
                            results[i] = _crash(proc.exitcode, fp)
                    continue
                if kind == "ready":
                    slot[2] = True
                elif kind == "started":
                    slot[3] = value
                else:
                    results[i], slot[1] = value, None
    finally:
        for conn, (proc, i, *_) in slots.items():
            conn.close()  # an idle worker reads EOF and exits; one still busy (only after an error) is killed
            if i is not None:
                proc.kill()
            proc.join()
    return results


def _serve(initargs, conn) -> None:
    """A worker of `isolated`: records one at a time until the pipe closes."""
    init(*initargs)
    try:
        conn.send(("ready", None))
        while True:
            rec = conn.recv()
            try:
                result = process(rec, started=lambda fp: conn.send(("started", fp)))
            except Exception as exc:  # noqa: BLE001 - outside process()'s own net (fingerprinting)
                result = {"fingerprint": None, "error": f"unreadable: {type(exc).__name__}: {exc}"}
            conn.send(("result", result))
    except (EOFError, BrokenPipeError):  # the parent closed the pipe: no more work
        return


def _crash(code: int | None, fp: str | None) -> dict:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        why = f"worker killed by signal {-code} ({name})"
    else:
        why = f"worker exited with code {code}"
    return {"fingerprint": fp, "error": f"decoder crash: {why}, twice, decoding this record alone"}
