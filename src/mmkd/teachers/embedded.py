"""Owns loading the embedded teachers: the specialists the `teachers` step trains under artifacts/teachers/."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import ClipEncoder
from mmkd.models.factory import image_spec, load_checkpoint


def load(spec: TeacherSpec, teachers_dir: Path, device: torch.device) -> ClipEncoder:
    from mmkd.teachers.registry import TeacherLoadError, weights_version

    folder = Path(spec.source) if spec.source else Path(teachers_dir) / spec.name
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise TeacherLoadError(f"teacher '{spec.name}': no checkpoint at {folder}; run the `teachers` step first")
    try:
        model, meta = load_checkpoint(folder, device)
    except Exception as exc:  # corrupt safetensors, wrong shapes, ...
        raise TeacherLoadError(f"teacher '{spec.name}': cannot load {weights}: {exc}") from exc
    if meta["model"] != spec.model:
        raise TeacherLoadError(f"teacher '{spec.name}': {folder} holds a '{meta['model']}', the registry says "
                               f"'{spec.model}'; re-run the `teachers` step")
    img = image_spec(model).with_overrides(spec.preprocess)
    return ClipEncoder(spec.name, model, open_clip.get_tokenizer(meta["model"]), device, img,
                       weights_version([weights], img.as_dict()))
