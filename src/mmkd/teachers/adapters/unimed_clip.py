"""Owns the UniMed-CLIP adapter: its QuickGELU ViT + BiomedBERT with an MLP projection, from the released .pt."""

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
    weights_file,
    split_prefixes,
    tensor_dict,
    text_tower,
    version,
)

# github mbzuai-oryx/UniMed-CLIP (6f09177): README quick start and app.py name the text tower and the weights
TEXT_HUB = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
# HF UzairK/unimed-clip-vit-b16 (app.py l.25-28), the README's SharePoint file, the two ViT-L-14-336 releases
WEIGHTS = ("unimed-clip-vit-b16.pt", "unimed_clip_vit_b16.pt", "unimed_clip_vit_l14_base_text_encoder.pt",
           "unimed_clip_vit_l14_large_text_encoder.pt")
CONTEXT = 256  # HFTokenizer(text_encoder_name, context_length=256): README, app.py l.41-45, run_configs_400m.py
HEAD_WIDTH = 64  # CLIPVisionCfg.head_width (src/open_clip/model.py l.312): heads = width // 64 (l.372)


class UniMedClipEncoder(Encoder):
    """CLIP.encode_image (VisualTransformer: class token -> ln_post -> proj) and CLIP.encode_text (HFTextEncoder:
    BERT masked where ids == pad_token_id, hidden state at [CLS], MLP projection); src/open_clip/model.py,
    hf_model.py."""

    def __init__(self, name: str, visual: torch.nn.Module, text: torch.nn.Module, proj: torch.nn.Module, tokenizer,
                 ctx: int, device: torch.device, spec: ImageSpec, version: str):
        self.visual, self.text, self.proj = visual.eval().to(device), text.eval().to(device), proj.eval().to(device)
        self.tokenizer, self.ctx = tokenizer, ctx
        super().__init__(name, spec, device, version)

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        # upstream pads every text to the context length; the mask hides the padding, so padding to the batch's
        # longest text gives the same embeddings with less work
        tok = self.tokenizer([_clean(t) for t in texts], padding=True, truncation=True, max_length=self.ctx,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = (ids != self.text.config.pad_token_id).long()  # hf_model.py l.155: the mask upstream builds
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.proj(hidden[:, 0])  # ClsLastHiddenStatePooler (hf_model.py l.82-93), then proj (l.146-152)


def _clean(text: str) -> str:
    """HFTokenizer's default clean 'whitespace' (src/open_clip/tokenizer.py l.60-69, l.103-105)."""
    import regex
    from open_clip.tokenizer import basic_clean  # ftfy.fix_text, html.unescape twice, strip: upstream's l.60-63

    return regex.sub(r"\s+", " ", basic_clean(text)).strip()


def _vit(visual: dict, path: Path, fail: Fail) -> torch.nn.Module:
    """open_clip's VisionTransformer (the same names and forward as UniMed's VisualTransformer, model.py l.256-305)
    with QuickGELU; patch, width, depth, grid and output dim read from the shapes."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    try:
        conv = visual["conv1.weight"]
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        layers = 1 + max(int(k.split(".")[2]) for k in visual if k.startswith("transformer.resblocks."))
        grid = math.isqrt(int(visual["positional_embedding"].shape[0]) - 1)
        output_dim = int(visual["proj"].shape[1])
        mlp_ratio = visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    except (KeyError, ValueError, IndexError) as exc:
        raise fail(f"{path} does not hold UniMed-CLIP's ViT image tower under visual. ({exc!r})") from exc
    if width % HEAD_WIDTH:
        raise fail(f"{path}: image tower width {width} is not a multiple of the head width {HEAD_WIDTH}")
    model = VisionTransformer(patch * grid, patch, width, layers, width // HEAD_WIDTH, mlp_ratio,
                              output_dim=output_dim, act_layer=QuickGELU)  # quick_gelu: true, force_quick_gelu
    load_strict(model, visual, "ViT image tower", path, fail)
    return model


def _mlp(proj: dict, path: Path, fail: Fail) -> torch.nn.Sequential:
    """HFTextEncoder proj_type 'mlp' (hf_model.py l.146-152): Linear(d, (d + e) // 2) -> GELU -> Linear(., e)."""
    w0, w2 = proj.get("0.weight"), proj.get("2.weight")
    if w0 is None or w2 is None or w0.ndim != 2 or w2.ndim != 2:
        raise fail(f"{path} has no MLP text projection text_encoder.proj.0.weight / text_encoder.proj.2.weight")
    head = torch.nn.Sequential(torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False), torch.nn.GELU(),
                               torch.nn.Linear(w2.shape[1], w2.shape[0], bias=False))
    load_strict(head, proj, "MLP text projection", path, fail)
    return head


def load(spec: TeacherSpec, device: torch.device, fail: Fail) -> UniMedClipEncoder:
    path = weights_file(spec, WEIGHTS, "UniMed-CLIP", "or give the file itself as source", fail)
    ckpt = read_weights(path, fail)
    # factory.py load_state_dict (l.53-61): the `state_dict` of a training checkpoint, `module.` stripped
    state = tensor_dict(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt, path, fail)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    parts = split_prefixes(state, {"visual.": "visual", "text_encoder.transformer.": "text",
                                   "text_encoder.proj.": "proj"}, ("logit_scale",), path, fail)
    visual = _vit(parts["visual"], path, fail)
    proj = _mlp(parts["proj"], path, fail)
    # BERT without its pooler, as HFTextEncoder builds it for pooler_type cls_last_hidden_state_pooler (l.115, 128)
    text, tokenizer, text_files = text_tower(spec, TEXT_HUB, fail, add_pooling_layer=False)
    load_strict(text, parts["text"], f"text model of {text_files[0]}", path, fail)
    if (proj[0].in_features, proj[2].out_features) != (text.config.hidden_size, visual.output_dim):
        raise fail(f"MLP text projection {tuple(proj[0].weight.shape)} -> {tuple(proj[2].weight.shape)} does not map "
                   f"the text width {text.config.hidden_size} to the image embedding dim {visual.output_dim}")
    ctx = context_length(spec, CONTEXT, text, fail)
    # image_transform(is_train=False) (transform.py l.86-94): Resize(bicubic) + CenterCrop, OpenAI mean/std
    # (get_mean_std, l.44-47)
    img = ImageSpec(int(visual.image_size[0]), OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest")
    img = img.with_overrides(spec.preprocess)
    return UniMedClipEncoder(spec.name, visual, text, proj, tokenizer, ctx, device, img,
                             version(spec, [path, *text_files], img, ctx))
