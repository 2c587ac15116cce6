"""Owns the PMC-CLIP adapter: its ModifiedResNet-50 + PubMedBERT from checkpoint.pt or the three extracted files."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import Encoder
from mmkd.models.preprocess import OPENAI_MEAN, OPENAI_STD, ImageSpec
from mmkd.teachers.adapters import (
    Fail,
    context_length,
    load_strict,
    read_weights,
    source_path,
    split_prefixes,
    tensor_dict,
    text_tower,
    version,
)

# the text tower of the released config RN50_fusion4.json (PubMedBERT, now named BiomedBERT)
TEXT_HUB = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"
CHECKPOINT = "checkpoint.pt"  # the training checkpoint: {"epoch", "name", "state_dict", "optimizer"}
# the encoders extracted from it (HF dataset axiong/pmc_oa), as the authors' quick-start notebook loads them
EXTRACTED = ("image_encoder(resnet50).pth", "text_encoder.pth", "text_projection_layer.pth")
# PMC_CLIP parameters that only its training losses use (MLM head, image-text fusion transformer)
TRAINING_ONLY = ("positional_embedding", "ln_final.", "mlm_projection", "logit_scale", "img_special_token",
                 "fusion_module.")
CONTEXT = 77  # RN50_fusion4.json text_cfg.context_length; the notebook pads to 77 as well


class PMCClipEncoder(Encoder):
    """The attention-pooled ModifiedResNet and the PubMedBERT [CLS] feature times text_projection."""

    def __init__(self, name: str, visual: torch.nn.Module, text: torch.nn.Module, projection: torch.Tensor,
                 tokenizer, ctx: int, pooler: bool, device: torch.device, spec: ImageSpec, version: str):
        self.visual, self.text = visual.eval().to(device), text.eval().to(device)
        self.projection = projection.to(device)
        self.tokenizer, self.ctx, self.pooler = tokenizer, ctx, pooler
        super().__init__(name, spec, device, version)

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.ctx, return_tensors="pt")
        # no attention mask, as upstream: the [PAD] tokens up to the context length are attended to as well
        out = self.text(input_ids=tok["input_ids"].to(self.device))
        # training code: hidden state at [CLS] (pmc_clip.py encode_text); the notebook: BERT's pooler output
        feats = out.pooler_output if self.pooler else out.last_hidden_state[:, 0]
        return feats @ self.projection


def _weights(spec: TeacherSpec, fail: Fail) -> tuple[dict, dict, torch.Tensor, list[Path]]:
    """(image tower state, text tower state, text_projection, files) from either released layout."""
    path = source_path(spec, fail)
    if path.is_dir():
        if (path / CHECKPOINT).is_file():
            path = path / CHECKPOINT
        elif all((path / f).is_file() for f in EXTRACTED):
            files = [path / f for f in EXTRACTED]
            visual, text = (tensor_dict(read_weights(f, fail), f, fail) for f in files[:2])
            proj = read_weights(files[2], fail)
            if not isinstance(proj, torch.Tensor):
                raise fail(f"{files[2]} does not hold the text projection tensor")
            return visual, text, proj, files
        else:
            raise fail(f"no PMC-CLIP weights in {path}: expected {CHECKPOINT} (the training checkpoint) or the "
                       f"three extracted files {', '.join(EXTRACTED)}")
    ckpt = read_weights(path, fail)
    state = tensor_dict(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt, path, fail)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel, as upstream strips it
        state = {k[len("module."):]: v for k, v in state.items()}
    parts = split_prefixes(state, {"visual.": "visual", "text_encoder.": "text", "text_projection": "proj"},
                           TRAINING_ONLY, path, fail)
    return parts["visual"], parts["text"], parts["proj"][""], [path]


def _resnet(visual: dict, heads: int | None, path: Path, fail: Fail) -> torch.nn.Module:
    """open_clip's ModifiedResNet (the same module as PMC-CLIP's blocks.py), its geometry read from the shapes."""
    from open_clip.modified_resnet import ModifiedResNet

    try:
        width = int(visual["conv3.weight"].shape[0])
        layers = [1 + max(int(k.split(".")[1]) for k in visual if k.startswith(f"layer{i}.")) for i in range(1, 5)]
        output_dim = int(visual["attnpool.c_proj.weight"].shape[0])
        grid = math.isqrt(int(visual["attnpool.positional_embedding"].shape[0]) - 1)
    except (KeyError, ValueError) as exc:
        raise fail(f"{path} does not hold PMC-CLIP's ModifiedResNet image tower ({exc!r})") from exc
    # upstream heads = width * 32 // head_width with head_width 64 (pmc_clip.py, config.py): 32 for RN50
    model = ModifiedResNet(layers, output_dim, heads or width * 32 // 64, image_size=32 * grid, width=width)
    load_strict(model, visual, "ModifiedResNet image tower", path, fail)
    return model


def _load(spec: TeacherSpec, device: torch.device, fail: Fail, quickstart: bool) -> PMCClipEncoder:
    visual_state, text_state, proj, files = _weights(spec, fail)
    # the quick-start notebook builds ModifiedResNet(..., heads=8) and projects BERT's pooler output
    visual = _resnet(visual_state, 8 if quickstart else None, files[0], fail)
    text, tokenizer, text_files = text_tower(spec, TEXT_HUB, fail)
    load_strict(text, text_state, f"text model of {text_files[0]}", files[min(1, len(files) - 1)], fail)
    hidden = int(text.config.hidden_size)
    if tuple(proj.shape) != (hidden, visual.output_dim):
        raise fail(f"text_projection {tuple(proj.shape)} does not map the text width {hidden} to the image "
                   f"embedding dim {visual.output_dim}")
    ctx = context_length(spec, CONTEXT, text, fail)
    # preprocess_val of pmc_clip/transform.py: Resize(224, bicubic) + CenterCrop(224), OpenAI mean/std
    img = ImageSpec(visual.image_size, OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest").with_overrides(spec.preprocess)
    return PMCClipEncoder(spec.name, visual, text, proj.detach().clone().float(), tokenizer, ctx, quickstart,
                          device, img, version(spec, files + text_files, img, ctx))


def load(spec: TeacherSpec, device: torch.device, fail: Fail) -> PMCClipEncoder:
    """PMC-CLIP as trained and evaluated by its code (adapter: pmc_clip)."""
    return _load(spec, device, fail, quickstart=False)


def load_quickstart(spec: TeacherSpec, device: torch.device, fail: Fail) -> PMCClipEncoder:
    """PMC-CLIP as the authors' quick-start notebook runs the extracted encoders (adapter: pmc_clip_quickstart)."""
    return _load(spec, device, fail, quickstart=True)
