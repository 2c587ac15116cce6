"""Owns curation's decoding on a Dask cluster: records cut into numbered partitions, decoded by Dask workers,
handed back to the driver in input order.

The driver (mmkd.data.curate) still lists the sources, decides exact / near duplicates and splits, and alone
writes the store and the index: it consumes (record, candidate) pairs exactly as it does from the local pool
(mmkd.data.workers.ordered_map), in the same order, so the same record is kept and the store is byte-identical
to the single-process run. Only the costly per-record work (read, check, decode, resize, hash, pHash,
thumbnail, encode) runs on the workers, through the same `process()` as the local pool.

Partitions are runs of `partition_records` consecutive records (numbered from 0 in source order). At most a
few per worker thread are in flight, so the driver holds a bounded number of decoded results however large
the corpus. A worker that dies has its partition rescheduled by Dask (up to the scheduler's
`distributed.scheduler.allowed-failures`); a partition that keeps killing workers (KilledWorker) is decoded
again here, each record in a process of its own (workers.isolated, the local pool's crash attribution), so a
record that kills decoders is quarantined as a decoder crash exactly as in the local run. Any other failure
of a partition fails the run naming the partition and its records; nothing was written to the live store
(the generation being built is discarded by the next run: mmkd.data.generation).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from contextlib import contextmanager
from itertools import count, islice
from multiprocessing import get_context
from typing import Iterable, Iterator

from mmkd.data import guard, workers
from mmkd.data.sources import READERS, RawRecord
from mmkd.data.store import CurationError
from mmkd.data.workers import Decoder

log = logging.getLogger("mmkd")

# worker side: the run whose settings mmkd.data.workers holds now, and how many partitions are using them; a
# worker shared by two runs (an existing cluster) switches only when no partition of the other run is running
_state = threading.Condition()
_current: str | None = None
_users = 0


@contextmanager
def _configured(setup: tuple) -> Iterator[None]:
    global _current, _users
    token, *initargs = setup
    with _state:
        while _current != token and _users:
            _state.wait()
        if _current != token:
            workers.init(*initargs)
            _current = token
        _users += 1
    try:
        yield
    finally:
        with _state:
            _users -= 1
            _state.notify_all()


def _setup(*args) -> tuple:
    return args


def decode_partition(setup: tuple, recs: list[RawRecord]) -> list[dict]:
    """Runs on a Dask worker: process() on each record of one partition, in order."""
    with _configured(setup):
        return [workers.process(rec) for rec in recs]


def partitions(records: Iterable[RawRecord], size: int) -> Iterator[tuple[int, list[RawRecord]]]:
    """(number, records): consecutive runs of `size` records in source order, numbered from 0."""
    it = iter(records)
    for number in count():
        part = list(islice(it, size))
        if not part:
            return
        yield number, part


def describe(number: int, part: list[RawRecord]) -> str:
    first, last = part[0], part[-1]
    return (f"partition {number} ({len(part)} records, {first.source}:{first.origin} .. "
            f"{last.source}:{last.origin})")


@contextmanager
def dask_client(dask_cfg) -> Iterator[object]:
    """A distributed Client on the cluster of `dask_cfg` (features.dask): its address, or a local cluster of
    n_workers processes started for the block and closed after it."""
    from distributed import Client, LocalCluster

    if dask_cfg.address:
        with Client(dask_cfg.address) as client:
            yield client
        return
    # the local cluster's worker processes import the calling script again, as the local pool's do
    guard.check_main_guard()
    with LocalCluster(n_workers=dask_cfg.n_workers, threads_per_worker=dask_cfg.threads_per_worker,
                      processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


def decoder(client, partition_records: int, local_workers: int = 1) -> Decoder:
    """A drop-in for workers.ordered_map (same arguments, same output, same order) that decodes on `client`.
    `local_workers`: processes for decoding a partition that killed Dask workers again here, one record each."""

    def dask_map(records: Iterable[RawRecord], cfg, known: frozenset[str], _workers: int):
        # the group-token secret is used by the driver only: it never leaves this process
        initargs = (cfg.model_copy(update={"group_key": None}), known, dict(READERS))
        token = uuid.uuid4().hex
        # a task every partition depends on: sent to each worker once, not with every partition (known holds every
        # fingerprint of the last run); not scattered, so the scheduler can compute it again when the workers
        # holding it died (scattered data would be lost, and every partition with it)
        setup = client.submit(_setup, token, *initargs, pure=False, key=f"curate-setup-{token}")
        window = max(2, 2 * sum(client.nthreads().values()))
        pending: deque = deque()  # (number, records, future), in input order
        try:
            for number, part in partitions(records, partition_records):
                pending.append((number, part, client.submit(decode_partition, setup, part, pure=False,
                                                            key=f"curate-decode-{token}-{number:08d}")))
                while len(pending) >= window:
                    yield from _collect(*pending.popleft(), initargs, local_workers)
            while pending:
                yield from _collect(*pending.popleft(), initargs, local_workers)
        finally:
            for *_, fut in pending:
                fut.cancel()
            setup.cancel()

    return dask_map


def _collect(number: int, part: list[RawRecord], fut, initargs: tuple, local_workers: int):
    from distributed import KilledWorker

    try:
        results = fut.result()
    except KilledWorker as exc:
        log.warning("curate: %s killed Dask workers (%s); decoding its records again here, each in a process of "
                    "its own", describe(number, part), exc)
        results = _isolated(number, part, initargs, local_workers)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the partition
        raise CurationError(f"curate: Dask decoding of {describe(number, part)} failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    finally:
        fut.release()
    if len(results) != len(part):
        raise CurationError(f"curate: {describe(number, part)} came back with {len(results)} results")
    return zip(part, results)


def _isolated(number: int, part: list[RawRecord], initargs: tuple, local_workers: int) -> list[dict]:
    guard.check_main_guard()
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([workers.__name__, *workers.PRELOAD])
    try:
        return workers.isolated(part, ctx, initargs, max(1, local_workers))
    except Exception as exc:  # noqa: BLE001 - the environment, not a record: fail naming the partition
        raise CurationError(f"curate: {describe(number, part)} could not be decoded here either: "
                            f"{type(exc).__name__}: {exc}") from exc
