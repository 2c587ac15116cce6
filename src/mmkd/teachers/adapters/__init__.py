"""Owns the `adapter` loader: bespoke teacher checkpoints rebuilt from upstream building blocks, one module per family."""

# A family module exposes `load(spec, device, fail) -> Encoder` and is registered by one line in ADAPTERS (bottom of
# this file). The helpers give every family the same guarantees: tensors only (safetensors or
# torch.load(weights_only=True)), strict loading that names the mismatching keys, text towers and tokenizers from
# local files only, and a version hashing the weights, the tokenizer and the preprocessing (docs/teachers.md).

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import Encoder
from mmkd.models.preprocess import ImageSpec
from mmkd.models.weights import read_weights  # noqa: F401  (the families read weights through here)

Fail = Callable[[str], Exception]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def source_path(spec: TeacherSpec, fail: Fail) -> Path:
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise fail(f"source {path} does not exist")
    return path


def weights_file(spec: TeacherSpec, names: tuple[str, ...], family: str, hint: str, fail: Fail) -> Path:
    """`source` as a weights file, or the first of `names` in the folder it names."""
    path = source_path(spec, fail)
    if path.is_dir():
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            raise fail(f"no {family} weights in {path}: expected {' or '.join(names)} ({hint})")
        path = found
    return path


def tensor_dict(obj, path: Path, fail: Fail) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise fail(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def split_prefixes(state: dict, parts: dict[str, str], ignored: tuple[str, ...], path: Path, fail: Fail) -> dict:
    """Route `prefix...` keys to parts; `ignored` prefixes are dropped; any other key is a foreign checkpoint."""
    out: dict[str, dict] = {name: {} for name in parts.values()}
    unknown = []
    for key, value in state.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None:
            out[parts[prefix]][key[len(prefix):]] = value
        elif not key.startswith(ignored):
            unknown.append(key)
    empty = [p for p, name in parts.items() if not out[name]]
    if unknown or empty:
        why = ([f"unexpected keys {unknown[:5]}"] if unknown else []) + ([f"nothing under {empty}"] if empty else [])
        raise fail(f"{path} is not the expected checkpoint: {'; '.join(why)}")
    return out


def load_strict(module: torch.nn.Module, state: dict, what: str, path: Path, fail: Fail,
                renames: tuple[tuple[str, str], ...] = ()) -> None:
    """load_state_dict(strict=True), after renaming legacy keys; a mismatch names the keys and shapes."""
    own = module.state_dict()
    if renames:  # checkpoints saved by an older library version: map a key only when its old name is not ours
        state = {next((k.replace(a, b, 1) for a, b in renames if k not in own and a in k), k): v
                 for k, v in state.items()}
    # buffers a module recomputes in __init__ (position_ids, relative_position_index: non-persistent in recent
    # transformers) are still saved by older versions; they are not weights
    recomputed = {n for n, _ in module.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in recomputed}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise fail(f"{path} does not match the {what}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                   f"shape mismatches {shapes[:5]}")
    module.load_state_dict(state, strict=True)


def text_tower(spec: TeacherSpec, hub_id: str, fail: Fail, **model_kwargs):
    """The Hugging Face text model (built from config.json; `model_kwargs` go to its constructor, e.g.
    add_pooling_layer=False) and tokenizer in `text_model`; and the files to hash."""
    from mmkd.teachers.openclip import hub_cache, hub_snapshot

    get = (f"on a connected machine `hf download {hub_id} config.json vocab.txt --local-dir <folder>` (older "
           f"huggingface_hub: huggingface-cli download), copy the folder here and name it in `text_model`")
    if not spec.text_model:
        raise fail(f"adapter {spec.adapter} needs `text_model`: a local folder with config.json and the tokenizer "
                   f"files (vocab.txt or tokenizer.json) of '{hub_id}'; {get}")
    folder = Path(spec.text_model).expanduser()
    if not folder.is_dir():
        cached = hub_snapshot(spec.text_model, "config.json") if spec.text_model.count("/") == 1 else None
        if cached is None:
            raise fail(f"text_model {folder} is neither a folder nor a repo in the local Hugging Face cache "
                       f"({hub_cache()}); it should hold config.json and the tokenizer of '{hub_id}'; {get}")
        folder = cached
    if not (folder / "config.json").is_file():
        raise fail(f"text_model {folder} has no config.json (the config of '{hub_id}'); {get}")
    tok_files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
    if not tok_files:
        raise fail(f"text_model {folder} has no tokenizer files (vocab.txt or tokenizer.json of '{hub_id}'); {get}")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        # random weights: the teacher checkpoint carries the trained ones
        model = AutoModel.from_config(config, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise fail(f"cannot build the text model or tokenizer from {folder}: {exc}") from exc
    return model, tokenizer, [folder / "config.json", *tok_files]


def context_length(spec: TeacherSpec, default: int, text_model, fail: Fail) -> int:
    ctx = spec.context_length or default
    positions = int(getattr(text_model.config, "max_position_embeddings", ctx))
    if ctx > positions:
        raise fail(f"context_length {ctx} exceeds the text tower's {positions} positions")
    return ctx


def version(spec: TeacherSpec, files: list[Path], img: ImageSpec, ctx: int) -> str:
    from mmkd.teachers.registry import weights_version

    return weights_version(files, {"adapter": spec.adapter, "preprocess": img.as_dict(), "context_length": ctx})


# the families use the helpers above, so they are imported after them
from mmkd.teachers.adapters import medclip, pmc_clip, unimed_clip

ADAPTERS: dict[str, Callable[[TeacherSpec, torch.device, Fail], Encoder]] = {
    "pmc_clip": pmc_clip.load,
    "pmc_clip_quickstart": pmc_clip.load_quickstart,
    "medclip": medclip.load,
    "unimed_clip": unimed_clip.load,
}


def load_adapter(spec: TeacherSpec, teachers_dir: Path, device: torch.device) -> Encoder:
    """The registry's `adapter` loader: dispatch on `spec.adapter`."""
    from mmkd.teachers.registry import TeacherLoadError

    def fail(msg: str) -> TeacherLoadError:
        return TeacherLoadError(f"teacher '{spec.name}': {msg}")

    family = ADAPTERS.get(spec.adapter or "")
    if family is None:
        raise fail(f"unknown adapter '{spec.adapter}'; known adapters: {', '.join(sorted(ADAPTERS))}")
    return family(spec, torch.device(device), fail)
