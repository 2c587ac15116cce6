"""Owns the hf_clip loader: transformers CLIPModel repos (PLIP, PubMedCLIP) from a local folder or the HF cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import Encoder
from mmkd.models.preprocess import OPENAI_MEAN, OPENAI_STD, ImageSpec
from mmkd.teachers.openclip import TOKENIZER_FILES, check_pickle, hub_cache, hub_snapshot

log = logging.getLogger(__name__)
# PIL resample codes of preprocessor_config.json; the rest (lanczos, box, hamming) fall back to bicubic
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_IGNORED_MISSING = ("position_ids",)  # buffers, not weights


class HFClipEncoder(Encoder):
    """A transformers CLIPModel: projected image / text features, its own tokenizer."""

    def __init__(self, name: str, model, tokenizer, max_length: int, device: torch.device, spec: ImageSpec,
                 version: str):
        self.model = model.eval().to(device)
        self.tokenizer, self.max_length = tokenizer, max_length
        super().__init__(name, spec, device, version)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 4 returns the projected tensor; 5 a BaseModelOutputWithPooling whose pooler_output it is
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(self.model.get_image_features(pixel_values=x))

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return self._features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                           attention_mask=tok["attention_mask"].to(self.device)))


def _side(v) -> int | None:
    if isinstance(v, dict):
        return v.get("shortest_edge") or v.get("height")
    return int(v) if v else None


def image_spec_from_processor(cfg: dict) -> ImageSpec:
    """ImageSpec from a preprocessor_config.json (CLIPImageProcessor / the older CLIPFeatureExtractor)."""
    cfg = cfg.get("image_processor", cfg)  # transformers 5 processor_config.json nests it
    size, crop = cfg.get("size", 224), cfg.get("crop_size")
    do_crop = cfg.get("do_center_crop", True) and crop is not None
    side = _side(crop) if do_crop else _side(size)
    squash = isinstance(size, dict) and "height" in size  # resize to exactly height x width
    if do_crop and not squash and _side(size) != side:
        log.warning("preprocessor resizes to %s then crops %s; mmkd resizes the short side to %s directly",
                    _side(size), side, side)
    resample = cfg.get("resample", 3)
    if resample not in _RESAMPLE:
        log.warning("preprocessor resample %s is not supported; using bicubic", resample)
    return ImageSpec(int(side), tuple(cfg.get("image_mean") or OPENAI_MEAN), tuple(cfg.get("image_std") or OPENAI_STD),
                     _RESAMPLE.get(resample, "bicubic"), "squash" if squash else "shortest")


def _weights(folder: Path) -> list[Path]:
    """What CLIPModel.from_pretrained will read: safetensors (single or sharded) first, else pytorch_model*.bin."""
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


def _locate(spec: TeacherSpec, fail) -> Path:
    path = Path(spec.source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise fail(f"source {path} is a file; loader hf_clip needs a folder in the Hugging Face layout")
        return path
    if spec.source.count("/") == 1 and not spec.source.startswith((".", "/", "~")):
        cached = hub_snapshot(spec.source, "config.json")
        if cached is not None:
            return cached
        raise fail(f"no folder {path}, and '{spec.source}' is not in the local Hugging Face cache ({hub_cache()}); "
                   f"downloads are off: run `hf download {spec.source}` (huggingface-cli download on older "
                   f"huggingface_hub; set HF_HOME for another cache) or give the downloaded folder as `source`")
    raise fail(f"source {path} does not exist")


def load(spec: TeacherSpec, teachers_dir: Path, device: torch.device) -> HFClipEncoder:
    from mmkd.teachers.registry import TeacherLoadError, weights_version

    def fail(msg: str) -> TeacherLoadError:
        return TeacherLoadError(f"teacher '{spec.name}': {msg}")

    folder = _locate(spec, fail)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read {folder / 'config.json'}: {exc}") from exc
    if config.get("model_type") != "clip":
        raise fail(f"{folder} holds a '{config.get('model_type')}', not a transformers CLIPModel (model_type clip)")
    weights = _weights(folder)
    if not weights:
        raise fail(f"no weights in {folder}; expected model.safetensors or pytorch_model.bin")
    for w in weights:
        check_pickle(w, fail)
    proc_files = [folder / f for f in ("preprocessor_config.json", "processor_config.json") if (folder / f).is_file()]
    if not proc_files:
        raise fail(f"no preprocessor_config.json in {folder}; the image preprocessing is unknown")

    from transformers import AutoTokenizer, CLIPModel

    try:
        # weights_only torch.load for .bin is transformers' default (and check_pickle has vetted the file)
        model, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                use_safetensors=weights[0].suffix == ".safetensors")
    except Exception as exc:  # corrupt file; shape mismatches raise too (ignore_mismatched_sizes is off)
        what = "do not match config.json" if "mismatch" in str(exc) else "cannot be loaded"
        raise fail(f"weights in {folder} {what}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(_IGNORED_MISSING)]
    if missing or info.get("mismatched_keys"):
        raise fail(f"weights in {folder} do not match config.json: missing {missing[:5]}, "
                   f"mismatched {list(info.get('mismatched_keys', []))[:5]}")
    model = model.float()  # transformers 5 keeps the checkpoint dtype; features are computed in fp32
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise fail(f"cannot load the tokenizer from {folder}: {exc}") from exc
    img = image_spec_from_processor(json.loads(proc_files[0].read_text())).with_overrides(spec.preprocess)
    positions = int(model.config.text_config.max_position_embeddings)
    max_length = spec.context_length or positions
    if max_length > positions:
        raise fail(f"context_length {max_length} exceeds the text tower's {positions} positions")
    tok_files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
    version = weights_version([*weights, folder / "config.json", *tok_files],
                              {"preprocess": img.as_dict(), "context_length": max_length})
    return HFClipEncoder(spec.name, model, tokenizer, max_length, device, img, version)
