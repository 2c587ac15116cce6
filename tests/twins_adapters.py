"""Tiny twins of the bespoke teachers, same architectures, saved in the real release layouts, offline, in about a second.

pmc_clip_twin (github WeixiongLin/PMC-CLIP): a ModifiedResNet image tower (open_clip's module, identical in names and
forward to src/pmc_clip/model/blocks.py), a BERT text tower and text_projection, saved either as the training
checkpoint.pt (torch.save of {"epoch", "name", "state_dict", "optimizer"}; state_dict keys `module.` + the PMC_CLIP
attribute names, including the parameters only its training losses use: fusion_module, mlm_projection,
img_special_token, positional_embedding, ln_final, logit_scale) or as the three files extracted from it on the HF
dataset axiong/pmc_oa (image_encoder(resnet50).pth, text_encoder.pth: bare state dicts; text_projection_layer.pth: a
tensor). The text tower's config.json and WordPiece tokenizer (PubMedBERT's special-token ids: [CLS] = 2, which
PMC_CLIP relies on) go to a separate folder, as a download of the BiomedBERT repo would.

medclip_twin (github RyanWangZf/MedCLIP): a transformers SwinModel (224 px, patch 4, window 7, like swin-tiny but
16 wide), a BERT text tower and the two bias-free projection heads, saved as pytorch_model.bin with MedCLIPModel's
key names (vision_model.model.*, vision_model.projection_head.weight, text_model.model.*,
text_model.projection_head.weight, logit_scale) in transformers 4.24's naming, which MedCLIP pins: Swin
attention.self.query/key/value, attention.output.dense, intermediate.dense, output.dense,
attention.self.relative_position_bias_table and the relative_position_index buffers; BERT embeddings.position_ids.

unimed_clip_twin (github mbzuai-oryx/UniMed-CLIP): a QuickGELU ViT (open_clip's VisionTransformer, the same names and
forward as UniMed's VisualTransformer in src/open_clip/model.py; 224 px, patch 32, width 128 so that upstream's
heads = width // 64 gives 2), a BERT text tower without pooler and the bias-free MLP projection of its HFTextEncoder
(proj.0, GELU, proj.2), saved with the CLIP attribute names (visual.*, text_encoder.transformer.*,
text_encoder.proj.*, logit_scale) either as a training checkpoint (src/training/main.py save_checkpoint: {"epoch",
"name", "state_dict", "optimizer", "scaler"}, keys `module.`-prefixed by DistributedDataParallel, BERT
position_ids saved as transformers 4.x did) or as a bare state dict. The text folder has 512 positions, as
BiomedBERT, so that the context length 256 fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

WORDS = ["chest", "x", "ray", "##s", "ct", "scan", "mri", "of", "the", "brain", "lung", "liver", "skin", "a", "an",
         "photo", "image", "showing", "normal", "abnormal", "tumor", "lesion", "##ing", "##ed", "-", ",", ".",
         "left", "right", "pleural", "effusion", "no", "acute", "findings"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # PubMedBERT's order: [CLS] is id 2
# transformers 5 Swin key -> the name transformers 4.x (MedCLIP's pin) saved it under
SWIN_V4_NAMES = (
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("attention.relative_position_bias.relative_position_index", "attention.self.relative_position_index"),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)


def text_folder(folder: Path, *, hidden: int = 32, layers: int = 2, max_positions: int = 128):
    """config.json + WordPiece tokenizer files of a tiny BERT; returns (folder, BertConfig)."""
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=max_positions)
    config.save_pretrained(folder)
    return folder, config


def _bert(config):
    from transformers import BertModel

    return BertModel(config).eval()  # with its pooler, as AutoModel.from_pretrained builds it


def _v4_bert_state(bert) -> dict:
    """As transformers < 4.31 saved BertModel: position_ids was a persistent buffer then."""
    state = dict(bert.state_dict())
    state.setdefault("embeddings.position_ids", bert.embeddings.position_ids.clone())
    return state


def _randomise(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter and BN statistic off its init (bn3 starts at zero, bias tables at zero, ...)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn_like(p) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 1.0))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)


@dataclass
class PMCClipTwin:
    source: Path  # what `source:` names: checkpoint.pt, or the folder of the extracted files
    text_dir: Path
    visual_state: dict  # ModifiedResNet state dict (reference forward is computed from it)
    text: torch.nn.Module  # the BertModel
    projection: torch.Tensor
    files: list[Path] = field(default_factory=list)


def pmc_clip_twin(root: Path, *, layout: str = "checkpoint", seed: int = 0, width: int = 8, embed_dim: int = 24,
                  hidden: int = 32) -> PMCClipTwin:
    """layout: checkpoint (checkpoint.pt, module.-prefixed) or extracted (the three files of axiong/pmc_oa)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import Transformer

    root = Path(root)
    text_dir, config = text_folder(root / "text", hidden=hidden)
    torch.manual_seed(seed)
    visual = ModifiedResNet([1, 2, 1, 1], embed_dim, heads=width * 32 // 64, image_size=224, width=width).eval()
    _randomise(visual)
    with torch.no_grad():  # peaky attention pooling, so that the head count (32 trained, 8 notebook) shows
        visual.attnpool.q_proj.weight.mul_(4)
        visual.attnpool.k_proj.weight.mul_(4)
    text = _bert(config)
    projection = torch.randn(hidden, embed_dim) * hidden ** -0.5
    folder = root / "pmc_clip"
    folder.mkdir(parents=True, exist_ok=True)
    visual_state = {k: v.clone() for k, v in visual.state_dict().items()}
    if layout == "extracted":
        files = [folder / "image_encoder(resnet50).pth", folder / "text_encoder.pth",
                 folder / "text_projection_layer.pth"]
        torch.save(visual_state, files[0])
        torch.save(_v4_bert_state(text), files[1])
        torch.save(projection, files[2])
        return PMCClipTwin(folder, text_dir, visual_state, text, projection, files)
    state = {f"visual.{k}": v for k, v in visual_state.items()}
    state.update({f"text_encoder.{k}": v for k, v in _v4_bert_state(text).items()})
    state["text_projection"] = projection
    # the rest of PMC_CLIP (pmc_clip.py __init__): training-only parameters, present in the real checkpoint
    state["positional_embedding"] = torch.randn(77, hidden)
    state["ln_final.weight"], state["ln_final.bias"] = torch.ones(hidden), torch.zeros(hidden)
    state["mlm_projection"] = torch.randn(hidden, config.vocab_size)
    state["logit_scale"] = torch.tensor(4.4292)
    state["img_special_token"] = torch.zeros(1, 1, embed_dim)
    state.update({f"fusion_module.{k}": v for k, v in Transformer(hidden, 1, 2).state_dict().items()})
    state = {f"module.{k}": v for k, v in state.items()}  # trained under DistributedDataParallel
    path = folder / "checkpoint.pt"
    torch.save({"epoch": 100, "name": "PMC_CLIP-twin", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}, path)
    return PMCClipTwin(path, text_dir, visual_state, text, projection, [path])


@dataclass
class MedCLIPTwin:
    source: Path  # the folder holding pytorch_model.bin (the unzipped medclip-vit-pretrained.zip)
    text_dir: Path
    vision: torch.nn.Module  # SwinModel
    vision_proj: torch.nn.Linear
    text: torch.nn.Module  # BertModel
    text_proj: torch.nn.Linear
    state: dict = field(default_factory=dict)


def _v4_swin_state(swin) -> dict:
    state = {}
    for key, value in swin.state_dict().items():
        state[next((key.replace(a, b, 1) for a, b in SWIN_V4_NAMES if a in key), key)] = value
    for name, buf in swin.named_buffers():  # relative_position_index was a persistent buffer in transformers 4
        if name.endswith("relative_position_index"):
            old = next((name.replace(a, b, 1) for a, b in SWIN_V4_NAMES if a in name), name)
            state.setdefault(old, buf.clone())
    return state


def medclip_twin(root: Path, *, seed: int = 0, embed_dim: int = 24, hidden: int = 32) -> MedCLIPTwin:
    from transformers import SwinConfig, SwinModel

    root = Path(root)
    text_dir, config = text_folder(root / "text", hidden=hidden, layers=4)  # layers 1, 2, -2, last differ
    torch.manual_seed(seed)
    swin = SwinModel(SwinConfig(image_size=224, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                window_size=7)).eval()
    _randomise(swin)
    vision_proj = torch.nn.Linear(swin.config.hidden_size, embed_dim, bias=False)
    text = _bert(config)
    text_proj = torch.nn.Linear(hidden, embed_dim, bias=False)
    state = {f"vision_model.model.{k}": v for k, v in _v4_swin_state(swin).items()}
    state["vision_model.projection_head.weight"] = vision_proj.weight.detach().clone()
    state.update({f"text_model.model.{k}": v for k, v in _v4_bert_state(text).items()})
    state["text_model.projection_head.weight"] = text_proj.weight.detach().clone()
    state["logit_scale"] = torch.log(torch.tensor(1 / 0.07))
    folder = root / "medclip-vit-pretrained"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    return MedCLIPTwin(folder, text_dir, swin, vision_proj.eval(), text, text_proj.eval(), state)


@dataclass
class UniMedClipTwin:
    source: Path  # the weights file (layout checkpoint) or the folder holding it (layout bare)
    text_dir: Path
    visual_state: dict  # the VisionTransformer state dict (the reference forward is computed from it)
    text: torch.nn.Module  # BertModel without pooler
    proj: torch.nn.Sequential  # Linear, GELU, Linear
    state: dict = field(default_factory=dict)  # the saved state dict, without `module.`


def unimed_clip_twin(root: Path, *, layout: str = "checkpoint", seed: int = 0, width: int = 128, embed_dim: int = 24,
                     hidden: int = 32) -> UniMedClipTwin:
    """layout: checkpoint (unimed_clip_vit_b16.pt, a module.-prefixed training checkpoint) or bare (a folder holding
    unimed-clip-vit-b16.pt, the state dict alone)."""
    from open_clip.transformer import QuickGELU, VisionTransformer
    from transformers import BertModel

    root = Path(root)
    text_dir, config = text_folder(root / "text", hidden=hidden, max_positions=512)
    torch.manual_seed(seed)
    visual = VisionTransformer(224, 32, width, 2, width // 64, 4.0, output_dim=embed_dim, act_layer=QuickGELU).eval()
    _randomise(visual)
    text = BertModel(config, add_pooling_layer=False).eval()
    _randomise(text, 0.5)
    mid = (hidden + embed_dim) // 2
    proj = torch.nn.Sequential(torch.nn.Linear(hidden, mid, bias=False), torch.nn.GELU(),
                               torch.nn.Linear(mid, embed_dim, bias=False)).eval()
    visual_state = {k: v.clone() for k, v in visual.state_dict().items()}
    state = {f"visual.{k}": v for k, v in visual_state.items()}
    bert = _v4_bert_state(text) if layout == "checkpoint" else dict(text.state_dict())
    state.update({f"text_encoder.transformer.{k}": v for k, v in bert.items()})
    state.update({f"text_encoder.proj.{k}": v.detach().clone() for k, v in proj.state_dict().items()})
    state["logit_scale"] = torch.tensor(4.6052)
    folder = root / "unimed_clip"
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "bare":
        torch.save(state, folder / "unimed-clip-vit-b16.pt")
        return UniMedClipTwin(folder, text_dir, visual_state, text, proj, state)
    path = folder / "unimed_clip_vit_b16.pt"
    torch.save({"epoch": 10, "name": "ViT-B-16-twin", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.0, "params": [0, 1]}]},
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0}}, path)
    return UniMedClipTwin(path, text_dir, visual_state, text, proj, state)
