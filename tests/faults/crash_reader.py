"""A source reader for fault tests whose decoding dies for real: a record's `loc["action"]` says how.

Registered at run time (READERS["crashy"]); ordered_map hands the registration to its workers, which import
this module afresh. Pixels are a seeded random image, so results are deterministic and comparable.
  segv / kill: the worker sends itself SIGSEGV / SIGKILL while decoding the record, every time
  once:        SIGKILL the first time only (a transient death: an OOM kill), normal on the retry
  hold:        the first time, write the worker's pid to loc["dir"]/<key>.pid and wait to be killed from
               outside; normal on the retry
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import time
from pathlib import Path

import numpy as np

from mmkd.data.imaging import RecordError
from mmkd.data.sources import RawRecord

KIND = "crashy"
MODULE = __name__


def record(i: int, action: str | None = None, tmp: Path | None = None, size: int = 24) -> RawRecord:
    return RawRecord("faults", KIND, f"r{i:03d}", f"r{i:03d}", loc={"seed": i, "action": action, "size": size,
                                                                   "dir": str(tmp) if tmp else None},
                     id=f"r{i:03d}", caption=f"random test image number {i}", modality="ct", split="train")


def load_pixels(rec: RawRecord, cfg) -> np.ndarray:
    action = rec.loc.get("action")
    first = action in ("once", "hold") and _first_time(rec)
    if action == "segv" or (action == "kill") or (action == "once" and first):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the working directory
        os.kill(os.getpid(), signal.SIGSEGV if action == "segv" else signal.SIGKILL)
        time.sleep(60)  # a signal is delivered at once; never reached
    if action == "hold" and first:
        pid_file = Path(rec.loc["dir"]) / f"{rec.key}.pid"
        pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
        pid_file.with_suffix(".tmp").rename(pid_file)
        for _ in range(600):  # the test kills us; if it never does, fail the record instead of hanging
            time.sleep(0.1)
        raise RecordError("hold: nobody killed this worker")
    size = rec.loc.get("size", 24)  # seeded noise without numpy.random (a 30 ms import in each fresh worker)
    noise = hashlib.shake_256(str(rec.loc["seed"]).encode()).digest(size * size * 3)
    return np.frombuffer(noise, np.uint8).reshape(size, size, 3).copy()


def _first_time(rec: RawRecord) -> bool:
    """True once per record: an O_EXCL marker file survives the worker's death."""
    try:
        os.close(os.open(Path(rec.loc["dir"]) / f"{rec.key}.seen", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def iter_records(spec, data_root: Path, limits=None):
    """Three records, then what pydicom raised on a header whose NumberOfFrames is '1A' (a listing-time error)."""
    for i in range(3):
        rec = record(i, None, None)
        rec.source, rec.kind = spec.name, spec.kind
        yield rec
    int("1A")
