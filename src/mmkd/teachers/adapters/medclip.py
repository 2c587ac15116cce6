"""Owns the MedCLIP adapter: MedCLIP-ViT (Swin-T + Bio_ClinicalBERT, 512-d) from its pytorch_model.bin."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import Encoder
from mmkd.models.preprocess import ImageSpec
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

TEXT_HUB = "emilyalsentzer/Bio_ClinicalBERT"  # medclip/constants.py BERT_TYPE
WEIGHTS = ("pytorch_model.bin", "model.safetensors")  # constants.WEIGHTS_NAME in medclip-vit-pretrained.zip
IMG_SIZE, IMG_MEAN, IMG_STD = 224, 0.5862785803043838, 0.27950088968644304  # constants.py: grey-level statistics
CONTEXT = 77  # MedCLIPProcessor sets tokenizer.model_max_length = 77 and tokenizes with truncation=True
LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> L: MedCLIP pastes every image on a grey ('L') canvas
# Swin keys as transformers 4.x saved them (MedCLIP pins 4.23-4.24) -> transformers 5 names; the same table as
# transformers' own legacy mapping (conversion_mapping.py, "swin"); applied only to keys the model lacks
SWIN_RENAMES = (
    ("attention.self.query.", "attention.q_proj."),
    ("attention.self.key.", "attention.k_proj."),
    ("attention.self.value.", "attention.v_proj."),
    ("attention.self.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
    ("attention.self.relative_position_index", "attention.relative_position_bias.relative_position_index"),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)


class MedCLIPEncoder(Encoder):
    """MedCLIPVisionModelViT (Swin pooler output -> projection) and MedCLIPTextModel (mean of BERT layers 1, 2 and
    last over the tokens -> projection); modeling_medclip.py."""

    def __init__(self, name: str, vision, vision_proj, text, text_proj, tokenizer, ctx: int, device: torch.device,
                 spec: ImageSpec, version: str):
        self.vision, self.vision_proj = vision.eval().to(device), vision_proj.eval().to(device)
        self.text, self.text_proj = text.eval().to(device), text_proj.eval().to(device)
        self.tokenizer, self.ctx = tokenizer, ctx
        super().__init__(name, spec, device, version)

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=x.device).view(1, 3, 1, 1)
        # MedCLIP sees grey images repeated to three channels: the luma of the pixels, normalised again
        grey = ((x * std + mean) * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return self.vision_proj(self.vision(pixel_values=(grey - mean) / std).pooler_output)

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.ctx, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        hidden = self.text(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        layers = torch.stack([hidden[1], hidden[2], hidden[-1]]).mean(0)  # upstream: tokens then layers; means commute
        # the mean over the text's own tokens: upstream also averages its batch's padding, so an embedding depends on
        # the other texts of the batch; this is upstream run on each text alone
        m = mask.unsqueeze(-1).to(layers.dtype)
        return self.text_proj((layers * m).sum(1) / m.sum(1))


def _swin(vision: dict, image_size: int, path: Path, fail: Fail):
    """transformers SwinModel: SwinConfig's defaults are swin-tiny-patch4-window7-224 (constants.VIT_TYPE); the
    geometry (patch, width, depths, heads, window) is read from the checkpoint's shapes."""
    from transformers import SwinConfig, SwinModel

    try:
        patch = vision["embeddings.patch_embeddings.projection.weight"]
        stages = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
        depths = [len({k.split(".")[4] for k in vision if k.startswith(f"encoder.layers.{i}.blocks.")})
                  for i in range(stages)]
        tables = [next(v for k, v in vision.items() if k.startswith(f"encoder.layers.{i}.blocks.0.")
                       and k.endswith("relative_position_bias_table")) for i in range(stages)]
        fc1 = next(v for k, v in vision.items() if k.startswith("encoder.layers.0.blocks.0.")
                   and k.endswith(("intermediate.dense.weight", "mlp.fc1.weight")))
    except (KeyError, ValueError, StopIteration) as exc:
        raise fail(f"{path} does not hold MedCLIP's Swin image tower under vision_model.model. ({exc!r})") from exc
    embed = int(patch.shape[0])
    config = SwinConfig(image_size=image_size, patch_size=int(patch.shape[-1]), num_channels=int(patch.shape[1]),
                        embed_dim=embed, depths=depths, num_heads=[int(t.shape[1]) for t in tables],
                        window_size=(math.isqrt(int(tables[0].shape[0])) + 1) // 2,  # table: (2w-1)^2 rows
                        mlp_ratio=fc1.shape[0] / embed,
                        use_absolute_embeddings="embeddings.position_embeddings" in vision)
    model = SwinModel(config)  # with the average-pool pooler, as AutoModel.from_pretrained(VIT_TYPE) builds it
    load_strict(model, vision, "Swin image tower", path, fail, renames=SWIN_RENAMES)
    return model


def _head(state: dict, what: str, path: Path, fail: Fail) -> torch.nn.Linear:
    """projection_head: nn.Linear(768, 512, bias=False) in both towers."""
    weight = state.get("weight")
    if weight is None or weight.ndim != 2:
        raise fail(f"{path} has no {what} projection_head.weight")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    load_strict(head, state, f"{what} projection head", path, fail)
    return head


def load(spec: TeacherSpec, device: torch.device, fail: Fail) -> MedCLIPEncoder:
    path = weights_file(spec, WEIGHTS, "MedCLIP", "the unzipped medclip-vit-pretrained.zip", fail)
    state = tensor_dict(read_weights(path, fail), path, fail)
    if "vision_model.model.conv1.weight" in state:
        raise fail(f"{path} is MedCLIP-ResNet50; this adapter builds MedCLIP-ViT (Swin-T, medclip-vit-pretrained)")
    parts = split_prefixes(state, {"vision_model.model.": "vision", "vision_model.projection_head.": "vproj",
                                   "text_model.model.": "text", "text_model.projection_head.": "tproj"},
                           ("logit_scale",), path, fail)
    # MedCLIPFeatureExtractor: pad to a square (fill 0), resize to 224 bicubic, normalise by the grey mean/std
    img = ImageSpec(IMG_SIZE, (IMG_MEAN,) * 3, (IMG_STD,) * 3, "bicubic", "longest", 0).with_overrides(spec.preprocess)
    vision = _swin(parts["vision"], img.size, path, fail)
    vproj, tproj = _head(parts["vproj"], "image", path, fail), _head(parts["tproj"], "text", path, fail)
    text, tokenizer, text_files = text_tower(spec, TEXT_HUB, fail)
    load_strict(text, parts["text"], f"text model of {text_files[0]}", path, fail)
    if (vproj.in_features, tproj.in_features) != (vision.config.hidden_size, text.config.hidden_size) \
            or vproj.out_features != tproj.out_features:
        raise fail(f"projection heads {tuple(vproj.weight.shape)} / {tuple(tproj.weight.shape)} do not fit the "
                   f"towers' widths {vision.config.hidden_size} / {text.config.hidden_size}")
    ctx = context_length(spec, CONTEXT, text, fail)
    return MedCLIPEncoder(spec.name, vision, vproj, text, tproj, tokenizer, ctx, device, img,
                          version(spec, [path, *text_files], img, ctx))
