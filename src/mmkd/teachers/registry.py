"""Owns teacher loading: the loader kinds of params.yaml `teachers.registry`, one module per family."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import Encoder


class TeacherLoadError(RuntimeError):
    """A registry entry could not be loaded; the message names the teacher and why."""


Loader = Callable[[TeacherSpec, Path, torch.device], Encoder]


def _loaders() -> dict[str, Loader]:
    # imported lazily: transformers (hf_clip, adapters) takes seconds to import and most runs never need it
    from mmkd.teachers import embedded, hf_clip, openclip
    from mmkd.teachers.adapters import load_adapter

    return {"embedded": embedded.load, "open_clip": openclip.load, "hf_clip": hf_clip.load, "adapter": load_adapter}


def weights_version(files: Iterable[Path], extra: dict | None = None) -> str:
    """A short content hash of the weight files plus whatever else changes the embeddings (preprocessing...)."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def check_dim(spec: TeacherSpec, enc: Encoder) -> Encoder:
    """A declared embed_dim that the loaded model does not produce is a mismatched checkpoint."""
    if spec.embed_dim is not None and enc.embed_dim != spec.embed_dim:
        raise TeacherLoadError(f"teacher '{spec.name}': registry says embed_dim {spec.embed_dim}, the loaded model "
                               f"produces {enc.embed_dim}; wrong checkpoint or wrong entry")
    return enc


def load_teacher(spec: TeacherSpec, teachers_dir: Path, device: torch.device) -> Encoder:
    """Load one registry entry as an Encoder whose `version` identifies its weights and preprocessing."""
    loader = _loaders().get(spec.loader)
    if loader is None:
        raise TeacherLoadError(f"teacher '{spec.name}': unsupported loader '{spec.loader}'")
    enc = loader(spec, Path(teachers_dir), torch.device(device))
    if spec.version:
        enc.version = spec.version
    return check_dim(spec, enc)
