"""Tiny twins of real teachers, in the real repositories' file layout, built offline in about a second.

biomedclip_twin: microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (open_clip hub layout: open_clip_config.json
with the real field names, open_clip_pytorch_model.bin, BERT WordPiece tokenizer files at the root; the text tower
names the real hub id microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract, whose tiny config.json is written to a
separate folder, as a download of that repo would be). A timm `test_vit` (ViT, cls token, patch 16, 160 px) stands in
for vit_base_patch16_224: open_clip's TimmModel builds the trunk at its default size.

hf_clip_twin: vinid/plip, flaviagiammarino/pubmed-clip-vit-base-patch32 (transformers CLIPModel layout: config.json,
model.safetensors or pytorch_model.bin, preprocessor_config.json, the real CLIP BPE vocabulary as vocab.json +
merges.txt, built from open_clip's bundled bpe_simple_vocab_16e6.txt.gz).
"""

from __future__ import annotations

import copy
import gzip
import json
import shutil
from pathlib import Path

import torch

BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
WORDS = ["chest", "x", "ray", "##s", "ct", "scan", "mri", "of", "the", "brain", "lung", "liver", "skin", "a", "an",
         "photo", "image", "showing", "normal", "abnormal", "tumor", "lesion", "##ing", "##ed", "-", ",", "."]


def biomedclip_config(embed_dim: int = 16, image_size: int = 160) -> dict:
    """BiomedCLIP's open_clip_config.json, field for field, with a tiny vision trunk."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": image_size},
            "text_cfg": {"hf_model_name": BIOMEDBERT, "hf_tokenizer_name": BIOMEDBERT, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
        },
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD},
    }


def bert_text_config(folder: Path, hidden: int = 32) -> Path:
    """A tiny BiomedBERT config.json (what `huggingface-cli download <BiomedBERT> config.json` gives, shrunk)."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
               vocab_size=5 + len(WORDS), max_position_embeddings=256).save_pretrained(folder)
    return folder


def biomedclip_twin(folder: Path, text_dir: Path | None = None, *, safetensors: bool = False, seed: int = 0,
                    embed_dim: int = 16, hidden: int = 32) -> tuple[Path, Path]:
    """Write a BiomedCLIP-layout teacher to `folder`; returns (folder, text-config folder)."""
    import open_clip
    from transformers import BertTokenizerFast

    folder, text_dir = Path(folder), Path(text_dir or f"{folder}-text")
    folder.mkdir(parents=True, exist_ok=True)
    bert_text_config(text_dir, hidden)
    cfg = biomedclip_config(embed_dim)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)  # tokenizer.json + tokenizer_config.json

    model_cfg = copy.deepcopy(cfg["model_cfg"])
    model_cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_model_pretrained=False)
    torch.manual_seed(seed)
    state = open_clip.CustomTextCLIP(**model_cfg).state_dict()
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, folder / "open_clip_model.safetensors")
    else:
        torch.save(state, folder / "open_clip_pytorch_model.bin")  # as the real repo ships it
    return folder, text_dir


def fake_hub_cache(cache: Path, repo_id: str, src: Path, commit: str = "0" * 40) -> Path:
    """Copy a folder into the HF hub cache layout (models--org--name/snapshots/<commit>, refs/main) as a download."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """The real CLIP vocabulary (49408 tokens) and merges, from open_clip's bundled BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}, merges


def hf_clip_twin(folder: Path, *, size: int = 32, patch: int = 8, safetensors: bool = True, seed: int = 0,
                 width: int = 32, projection_dim: int = 16) -> Path:
    """Write a transformers CLIPModel teacher in the PLIP / PubMedCLIP repository layout."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    tower = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=77),
                        vision_config=dict(tower, image_size=size, patch_size=patch), projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    if not safetensors:  # the older repos ship pytorch_model.bin only
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder
