"""Owns reading weight files safely: safetensors, or torch.load(weights_only=True) with errors that say why."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

Fail = Callable[[str], Exception]


def _reason(exc: Exception) -> str:
    """The informative line of torch.load's long messages (the refused global, the zip error)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    hit = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else type(exc).__name__)
    return hit[:240]


def read_weights(path: Path, fail: Fail):
    """A safetensors file, or a torch.save file unpickled with weights_only=True (it refuses code before running any)."""
    zipped = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        zipped = zipfile.is_zipfile(path)
        # mmap (zip format only) maps the storages instead of reading them; load_state_dict copies what it needs
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        if zipped:  # a well-formed checkpoint whose pickle holds objects other than tensors and plain containers
            raise fail(f"{path} is not a plain tensor checkpoint: torch.load(weights_only=True) refused to unpickle it "
                       f"({_reason(exc)}); only weights are loaded, so re-save its state_dict or convert it to "
                       f"safetensors") from exc
        raise fail(f"{path} is corrupt or not a PyTorch weights file ({_reason(exc)})") from exc
    except Exception as exc:
        raise fail(f"{path} is corrupt or not a weights file ({_reason(exc)})") from exc
