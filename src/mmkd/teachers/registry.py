"""Owns teacher loading: one function per loading family, chosen by the registry entry's `source`."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import ClipEncoder
from mmkd.models.factory import load_checkpoint, register_configs


class TeacherLoadError(RuntimeError):
    """A registry entry could not be loaded; the message names the teacher and why."""


def _embedded(spec: TeacherSpec, teachers_dir: Path, device) -> ClipEncoder:
    folder = Path(teachers_dir) / spec.name
    if not (folder / "model.safetensors").exists():
        raise TeacherLoadError(f"teacher '{spec.name}': no checkpoint at {folder}; run the `teachers` step first")
    model, meta = load_checkpoint(folder, device)
    return ClipEncoder(spec.name, model, open_clip.get_tokenizer(meta["model"]), device)


def _open_clip_local(spec: TeacherSpec, device) -> ClipEncoder:
    """An open_clip architecture with local weights (safetensors, or a weights-only torch file)."""
    register_configs()
    if not spec.checkpoint or not Path(spec.checkpoint).exists():
        raise TeacherLoadError(f"teacher '{spec.name}': checkpoint '{spec.checkpoint}' not found")
    kwargs = {"force_context_length": spec.context_length} if spec.context_length else {}
    try:
        model = open_clip.create_model(spec.model, pretrained=spec.checkpoint, device=device,
                                       weights_only=True, require_pretrained=True, **kwargs)
    except Exception as exc:  # open_clip raises a variety of errors for bad weights
        raise TeacherLoadError(f"teacher '{spec.name}': cannot load {spec.checkpoint} as {spec.model}: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(spec.model, **({"context_length": spec.context_length} if spec.context_length else {}))
    return ClipEncoder(spec.name, model, tokenizer, device)


def _open_clip_hub(spec: TeacherSpec, device) -> ClipEncoder:
    """Public open_clip teachers, e.g. hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224."""
    name = spec.model if spec.model.startswith("hf-hub:") else f"hf-hub:{spec.model}"
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:
        raise TeacherLoadError(
            f"teacher '{spec.name}': cannot load {name} ({type(exc).__name__}: {exc}). Hub teachers need the "
            "weights in the local Hugging Face cache (HF_HOME) or network access.") from exc
    return ClipEncoder(spec.name, model, tokenizer, device)


def load_teacher(spec: TeacherSpec, teachers_dir: Path, device: torch.device) -> ClipEncoder:
    if spec.source == "embedded":
        return _embedded(spec, teachers_dir, device)
    if spec.source == "open_clip":
        return _open_clip_local(spec, device)
    if spec.source == "open_clip_hub":
        return _open_clip_hub(spec, device)
    raise TeacherLoadError(f"teacher '{spec.name}': unsupported source '{spec.source}'")
