"""Owns training-state checkpoints: atomic writes, safe loads, and the `resume: auto` decision.

A state holds everything a run needs to continue exactly where it stopped: model, optimiser and scheduler states,
every RNG (the loop's generator, torch's global and CUDA generators, numpy, random), the objective's own state
(e.g. the teacher sampler), the epoch's sample order and the position in it. It is written to a temporary file
in the same folder, flushed to disk and renamed over `state.pt`, so a kill at any moment leaves either the old
or the new state, never half of one; the temp file a killed save left is deleted by the next save or load.
Loading uses `torch.load(weights_only=True)`: no pickled code runs. A state is resumed only by a run of the same
fingerprint: config, seed, and the data's content (the curated keys, which hash the decoded pixels, and the
feature sets' checksums), so a re-curated corpus never continues an old state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from mmkd import atomic

log = logging.getLogger("mmkd")
STATE_FILE = "state.pt"


def fingerprint(*parts) -> str:
    """A stable hash of what makes two runs the same run (config, data, initial weights)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "loop": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["loop"])
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    keys, gauss = state["python"]
    random.setstate((3, tuple(keys), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_id(keys) -> str:
    """A hash of the training data's content: its records' keys (the curated content hashes), in order."""
    from mmkd.data.split_table import text_digest

    return text_digest(map(str, keys))[:16]  # streamed: no corpus-sized joined string


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files of saves that were killed (training may run without the workspace lock, under
    torchrun: a live process's save in progress stays)."""
    gone = atomic.remove_stale_temps(folder, name=STATE_FILE, dead_writers_only=True)
    if gone:
        log.info("removed %d temp file(s) of killed state saves in %s", len(gone), folder)
    return gone


def save_state(folder: Path, state: dict) -> Path:
    """Write state atomically as folder/state.pt (temp file + fsync + rename), streamed (never all in memory
    twice)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    final = folder / STATE_FILE
    with atomic.replacing(final) as fh:
        torch.save(state, fh)
    return final


def load_state(folder: Path) -> dict | None:
    if Path(folder).is_dir():
        remove_stale_temps(folder)
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def resumable(folder: Path | None, mode: str, expected: str, desc: str) -> dict | None:
    """The state to continue from under `resume: auto`: an unfinished state of the same run, else None (with why)."""
    if folder is None or mode == "never":
        return None
    try:
        state = load_state(folder)
    except Exception as exc:  # a state we cannot read is not worth failing the run: say so and start over
        log.warning("%s: cannot read the saved training state in %s (%s); starting over", desc, folder, exc)
        return None
    if state is None:
        return None
    if state.get("fingerprint") != expected:
        log.info("%s: the saved state in %s belongs to another configuration or data; starting over", desc, folder)
        return None
    if state.get("complete"):
        log.info("%s: the saved state in %s is of a finished run; training afresh", desc, folder)
        return None
    log.info("%s: resuming from step %d (%s)", desc, state["step"], folder)
    return state
