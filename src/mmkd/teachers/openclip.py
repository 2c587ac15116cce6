"""Owns the open_clip loader: hf-hub ids, hub-layout folders (BiomedCLIP) and checkpoint files plus a config name."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import ClipEncoder
from mmkd.models.factory import image_spec, register_configs

HUB_PREFIX = "hf-hub:"
# open_clip's own preference order (factory._find_checkpoint_in_dir), so the file we hash is the file it loads
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model")
TEXT_SUBDIR = "text_model"  # <teacher folder>/text_model/config.json: the HF text tower's config, shipped beside it

Fail = Callable[[str], Exception]


def hub_snapshot(repo_id: str, filename: str) -> Path | None:
    """The cached snapshot folder of a hub repo holding `filename`; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id (HFValidationError)
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def check_pickle(path: Path, fail: Fail) -> None:
    """A .bin/.pt/.pth must hold tensors only: weights_only refuses pickled code before any library loads it."""
    if path.suffix == ".safetensors":
        return
    try:
        # mmap (zip format only) maps the storages instead of reading them, so this check costs little
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        raise fail(f"{path} is corrupt or is not a plain tensor checkpoint (only weights are unpickled; "
                   f"convert it to safetensors if it carries other objects): {exc}") from exc


def _folder_weights(folder: Path, fail: Fail) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise fail(f"no weights file in {folder}; expected one of {', '.join(WEIGHT_NAMES[:4])}")


def _read_config(folder: Path, fail: Fail) -> dict:
    path = folder / "open_clip_config.json"
    if not path.is_file():
        raise fail(f"{folder} has no open_clip_config.json; not an open_clip hub-layout folder (for a bare checkpoint "
                   f"file give `source: <file>` and `model: <open_clip config name>`)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read {path}: {exc}") from exc
    if "model_cfg" not in cfg:
        raise fail(f"{path} has no model_cfg")
    return cfg


def _is_text_config(path: Path) -> bool:
    from open_clip.hf_configs import arch_dict

    try:
        return json.loads(path.read_text()).get("model_type") in arch_dict
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _text_model_dir(spec: TeacherSpec, text_cfg: dict, folder: Path | None, fail: Fail) -> Path | None:
    """Where the Hugging Face text tower's config.json is, offline: open_clip would fetch it from the hub."""
    name = text_cfg.get("hf_model_name")
    if not name:
        return None
    if spec.text_model:
        path = Path(spec.text_model).expanduser()
        if not (path / "config.json").is_file():
            raise fail(f"text_model {path} has no config.json (the config of the text model '{name}')")
        return path
    candidates = [Path(name)] + ([folder / TEXT_SUBDIR, folder] if folder else [])
    for path in candidates:  # a config already pointing at a local folder, then the teacher folder
        if _is_text_config(path / "config.json"):
            return path
    cached = hub_snapshot(name, "config.json")
    if cached is not None:
        return cached
    beside = folder / TEXT_SUBDIR if folder else f"<teacher folder>/{TEXT_SUBDIR}"
    raise fail(f"its text tower is the Hugging Face model '{name}', whose config.json is not available offline. "
               f"Provide it one of these ways: `text_model: <folder with {name}'s config.json>` in the registry "
               f"entry; or copy that config.json into {beside}; or `hf download {name} config.json` (huggingface-cli "
               f"download on older huggingface_hub) into the HF cache ({hub_cache()}; set HF_HOME for another one)")


def _tokenizer(model_name: str, text_cfg: dict, dirs: list[Path | None], ctx: int, fail: Fail):
    """open_clip's tokenizer for the config; an HF tokenizer is read from local files (teacher folder first)."""
    from open_clip.tokenizer import HFTokenizer

    if "hf_tokenizer_name" not in text_cfg:
        return open_clip.get_tokenizer(model_name, context_length=ctx), []
    hub = text_cfg["hf_tokenizer_name"]
    if hub:  # after the local folders: the tokenizer's own repo in the HF cache
        dirs = dirs + [hub_snapshot(hub, f) for f in ("tokenizer_config.json", "tokenizer.json")]
    for d in (d for d in dirs if d is not None):
        files = [d / f for f in TOKENIZER_FILES if (d / f).is_file()]
        if files:
            # the same construction as open_clip.get_tokenizer('local-dir:...') (factory.py)
            tok = HFTokenizer(str(d), context_length=ctx, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                              **text_cfg.get("tokenizer_kwargs", {}))
            return tok, files
    raise fail(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}) in {[str(d) for d in dirs if d]}; the "
               f"tokenizer '{hub}' is needed offline: put its files in the teacher folder or `text_model`")


def _locate(spec: TeacherSpec, fail: Fail) -> Path:
    """The hub-layout folder (an hf-hub id resolved in the local cache) or the checkpoint file of `source`."""
    if not spec.source:
        raise fail("loader open_clip needs `source`: hf-hub:org/name, a hub-layout folder or a checkpoint file")
    if spec.source.startswith(HUB_PREFIX):
        repo = spec.source[len(HUB_PREFIX):]
        folder = hub_snapshot(repo, "open_clip_config.json")
        if folder is None:
            raise fail(f"'{repo}' is not in the local Hugging Face cache ({hub_cache()}) and downloads are off; "
                       f"run `hf download {repo}` (huggingface-cli download on older huggingface_hub; set HF_HOME to "
                       f"use another cache), or download it to a folder and give that folder as `source`")
        return folder
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise fail(f"source {path} does not exist")
    if path.is_file() and not spec.model:
        raise fail(f"source {path} is a checkpoint file; `model` must name its open_clip config (e.g. ViT-B-16)")
    return path


def load(spec: TeacherSpec, teachers_dir: Path, device: torch.device) -> ClipEncoder:
    from mmkd.teachers.registry import TeacherLoadError, weights_version

    def fail(msg: str) -> TeacherLoadError:
        return TeacherLoadError(f"teacher '{spec.name}': {msg}")

    path = _locate(spec, fail)
    if path.is_dir():
        folder, model_name, pretrained = path, f"local-dir:{path}", None
        model_cfg = _read_config(path, fail)["model_cfg"]
        weights = _folder_weights(path, fail)
    else:
        register_configs()
        folder, model_name, pretrained, weights = None, spec.model.replace("/", "-"), str(path), path
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise fail(f"unknown open_clip config '{spec.model}'")
    text_cfg = model_cfg.get("text_cfg", {})
    text_dir = _text_model_dir(spec, text_cfg, folder, fail)
    # a patched text_cfg (kwargs override the config in open_clip.create_model): the HF config from the local folder,
    # and no base-weight download since the CLIP checkpoint carries the text tower's weights
    patched = {**text_cfg, "hf_model_name": str(text_dir), "hf_model_pretrained": False}
    kwargs = {"text_cfg": patched} if text_dir else {}
    check_pickle(weights, fail)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device, weights_only=True,
                                       require_pretrained=True, **kwargs)
    except Exception as exc:
        what = "does not match the architecture of its config" if "state_dict" in str(exc) else "cannot be loaded"
        raise fail(f"weights {weights} {what}: {exc}") from exc
    ctx = spec.context_length or text_cfg.get("context_length", 77)
    limit = getattr(model, "context_length", None)  # positional embeddings of the text tower
    if limit and ctx > limit:
        raise fail(f"context_length {ctx} exceeds the text tower's {limit} positions")
    tokenizer, tok_files = _tokenizer(model_name, text_cfg, [folder, text_dir], ctx, fail)
    img = image_spec(model).with_overrides(spec.preprocess)
    version = weights_version([weights, *tok_files],
                              {"preprocess": img.as_dict(), "context_length": ctx, "model_cfg": model_cfg})
    return ClipEncoder(spec.name, model, tokenizer, device, img, version)
