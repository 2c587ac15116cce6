"""Owns starting a student from a local natural-image CLIP checkpoint, as the reference starts from MetaCLIP.

The reference loads a MetaCLIP ViT-B/16 non-strictly: the image tower takes the checkpoint's weights, the text
tower (PubMedBERT there, a different architecture) keeps its own. Here: the checkpoint is read as tensors only
(safetensors or torch.load(weights_only=True)), the `towers` prefixes are kept, open_clip's position-embedding
resize adapts another input size, and every key whose shape still differs is reported rather than loaded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from mmkd.models.weights import read_weights

log = logging.getLogger("mmkd")
WEIGHT_NAMES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")


class InitError(ValueError):
    pass


def _fail(msg: str) -> InitError:
    return InitError(f"pretrain.init: {msg}")


def checkpoint_file(source: str | Path) -> Path:
    """A weights file, or the first known weights file in a hub-layout folder."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
        if found is None:
            raise _fail(f"no weights in {path}: expected one of {', '.join(WEIGHT_NAMES)}")
        return found
    if not path.is_file():
        raise _fail(f"{path} does not exist")
    return path


def _state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):  # training checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _fail(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def init_from_clip(model: torch.nn.Module, source: str | Path, towers: tuple[str, ...] = ("visual",)) -> dict:
    """Load the `towers` of a CLIP checkpoint into model, non-strictly; returns what was loaded and skipped."""
    from open_clip.model import resize_pos_embed

    path = checkpoint_file(source)
    state = _state_dict(read_weights(path, _fail), path)
    wanted = {k: v for k, v in state.items() if k.startswith(tuple(f"{t}." for t in towers))}
    if not wanted:
        raise _fail(f"{path} has no weights under {list(towers)} (its keys start with "
                    f"{sorted({k.split('.')[0] for k in state})[:8]})")
    resize_pos_embed(wanted, model)  # another input size: interpolate the image tower's position grid
    own = model.state_dict()
    loadable = {k: v for k, v in wanted.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(k for k in wanted if k in own and own[k].shape != wanted[k].shape)
    unknown = sorted(k for k in wanted if k not in own)
    if not loadable:
        raise _fail(f"nothing in {path} fits this model: shape mismatches {mismatched[:5]}, unknown keys {unknown[:5]}")
    model.load_state_dict(loadable, strict=False)
    missing = sorted(k for k in own if k.startswith(tuple(f"{t}." for t in towers)) and k not in loadable)
    if mismatched or unknown or missing:
        log.warning("pretrain.init: %d tensors loaded from %s; not loaded: %d of other shape (%s), %d unknown (%s); "
                    "%d of the model's %s tensors keep their fresh values (%s)", len(loadable), path,
                    len(mismatched), mismatched[:3], len(unknown), unknown[:3], len(missing), towers, missing[:3])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return {"source": str(path), "sha256": digest, "towers": list(towers), "loaded": len(loadable),
            "mismatched": len(mismatched), "unknown": len(unknown), "missing": len(missing)}
