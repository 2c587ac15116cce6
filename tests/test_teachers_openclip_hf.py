"""Teacher loaders open_clip and hf_clip (plus embedded's missing-checkpoint error), checked on tiny twins in the real
repository layouts against the upstream libraries' own preprocessing, tokenizers and forward passes."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmkd.config import PreprocessCfg, TeacherSpec
from mmkd.teachers.registry import TeacherLoadError, load_teacher
from tests.twins import BIOMEDBERT, biomedclip_twin, fake_hub_cache, hf_clip_twin

CPU = torch.device("cpu")
TEXTS = ["chest x-ray showing a tumor", "ct scan of the brain", "normal lung, an image"]


# no test here may reach the network or a real Hugging Face cache (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("offline_empty_cache")


def images(sizes=((200, 170), (130, 260), (160, 160))) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for w, h in sizes:
        small = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)  # smooth-ish content
        out.append(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    return out


def load(tmp_path, **kw):
    return load_teacher(TeacherSpec(name=kw.pop("name", "twin"), **kw), tmp_path, CPU)


def close(a, b, atol=1e-5) -> bool:
    return a.shape == b.shape and np.allclose(a, b, atol=atol)


# --------------------------------------------------------------------------------------------- open_clip (BiomedCLIP)
@pytest.fixture(scope="module")
def bmc(tmp_path_factory) -> tuple[Path, Path]:
    return biomedclip_twin(tmp_path_factory.mktemp("bmc") / "BiomedCLIP")


def open_clip_reference(folder: Path, text_dir: Path, work: Path):
    """Upstream: open_clip's own local-dir loading, the config pointed at the local text model (open_clip issue 772)."""
    import open_clip

    ref = work / "reference"
    shutil.copytree(folder, ref)
    cfg = json.loads((ref / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["hf_model_name"] = str(text_dir)
    (ref / "open_clip_config.json").write_text(json.dumps(cfg))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{ref}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ref}")
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images()])), dim=-1).numpy()
        txt = F.normalize(model.encode_text(tokenizer(TEXTS)), dim=-1).numpy()
    return img, txt


@pytest.fixture(scope="module")
def bmc_reference(bmc, tmp_path_factory):
    return open_clip_reference(*bmc, tmp_path_factory.mktemp("ref"))


def check_same(enc, reference, atol=1e-5):
    img, txt = reference
    assert close(enc.encode_pil(images()), img, atol), "image embeddings differ from upstream"
    assert close(enc.encode_texts(TEXTS), txt, atol), "text embeddings differ from upstream"


def test_biomedclip_folder_matches_open_clip(bmc, bmc_reference, tmp_path):
    folder, text_dir = bmc
    enc = load(tmp_path, loader="open_clip", source=str(folder), text_model=str(text_dir), embed_dim=16)
    check_same(enc, bmc_reference)
    assert enc.spec.size == 160 and enc.spec.resize_mode == "shortest" and enc.spec.interpolation == "bicubic"
    assert enc.spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert enc.tokenizer.context_length == 256


def test_biomedclip_safetensors_variant(tmp_path, bmc_reference):
    folder, text_dir = biomedclip_twin(tmp_path / "st", safetensors=True)  # the same seed: the same weights
    assert not (folder / "open_clip_pytorch_model.bin").exists()
    check_same(load(tmp_path, loader="open_clip", source=str(folder), text_model=str(text_dir)), bmc_reference)


def test_preprocess_cfg_of_the_folder_is_followed(bmc, tmp_path):
    """BiomedCLIP's own preprocess_cfg is OpenAI's default; a folder with another one must be read, not assumed."""
    folder, text_dir = bmc
    copy = tmp_path / "other-preprocess"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "open_clip_config.json").read_text())
    cfg["preprocess_cfg"] = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
                             "resize_mode": "squash"}
    (copy / "open_clip_config.json").write_text(json.dumps(cfg))
    enc = load(tmp_path, loader="open_clip", source=str(copy), text_model=str(text_dir))
    assert (enc.spec.interpolation, enc.spec.resize_mode, enc.spec.std) == ("bilinear", "squash", (0.2, 0.25, 0.3))
    check_same(enc, open_clip_reference(copy, text_dir, tmp_path))


@pytest.mark.parametrize("where", ["root", "subfolder", "hf_cache"])
def test_text_config_resolved_offline(where, bmc, bmc_reference, tmp_path, offline_empty_cache):
    folder, text_dir = bmc
    copy = tmp_path / "BiomedCLIP"
    shutil.copytree(folder, copy)
    if where == "root":
        shutil.copy(text_dir / "config.json", copy / "config.json")
    elif where == "subfolder":
        shutil.copytree(text_dir, copy / "text_model")
    else:
        fake_hub_cache(offline_empty_cache, BIOMEDBERT, text_dir)
    check_same(load(tmp_path, loader="open_clip", source=str(copy)), bmc_reference)


def test_text_config_unresolvable_offline(bmc, tmp_path):
    folder, _ = bmc
    with pytest.raises(TeacherLoadError) as err:
        load(tmp_path, name="biomedclip", loader="open_clip", source=str(folder))
    msg = str(err.value)
    assert "teacher 'biomedclip'" in msg and BIOMEDBERT in msg and "config.json" in msg
    assert "text_model" in msg and f"`hf download {BIOMEDBERT} config.json`" in msg


def test_tokenizer_from_the_text_model_folder(bmc, bmc_reference, tmp_path):
    """A download without tokenizer files at the root: the text model's folder (or its cached repo) supplies them."""
    folder, text_dir = bmc
    copy, text_copy = tmp_path / "BiomedCLIP", tmp_path / "BiomedBERT"
    shutil.copytree(folder, copy)
    shutil.copytree(text_dir, text_copy)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.move(copy / name, text_copy / name)
    check_same(load(tmp_path, loader="open_clip", source=str(copy), text_model=str(text_copy)), bmc_reference)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (text_copy / name).unlink()
    with pytest.raises(TeacherLoadError, match=rf"teacher 'x'.*no tokenizer files.*'{BIOMEDBERT}'"):
        load(tmp_path, name="x", loader="open_clip", source=str(copy), text_model=str(text_copy))


def test_hf_hub_id_from_local_cache(bmc, bmc_reference, tmp_path, offline_empty_cache):
    folder, text_dir = bmc
    repo = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    fake_hub_cache(offline_empty_cache, repo, folder)
    fake_hub_cache(offline_empty_cache, BIOMEDBERT, text_dir)
    check_same(load(tmp_path, loader="open_clip", source=f"hf-hub:{repo}"), bmc_reference)


def test_hf_hub_id_not_cached(tmp_path):
    with pytest.raises(TeacherLoadError, match=r"teacher 'bmc'.*'org/absent'.*`hf download org/absent`"):
        load(tmp_path, name="bmc", loader="open_clip", source="hf-hub:org/absent")


def test_preprocess_and_context_overrides(bmc, tmp_path):
    folder, text_dir = bmc
    enc = load(tmp_path, loader="open_clip", source=str(folder), text_model=str(text_dir), context_length=64,
               preprocess=PreprocessCfg(size=128, interpolation="bilinear", resize_mode="squash"))
    assert (enc.spec.size, enc.spec.interpolation, enc.spec.resize_mode) == (128, "bilinear", "squash")
    assert enc.tokenizer.context_length == 64
    assert enc.encode_texts(TEXTS).shape == (3, 16)


def test_version_stable_and_follows_weights(bmc, tmp_path):
    folder, text_dir = bmc
    spec = {"loader": "open_clip", "source": str(folder), "text_model": str(text_dir)}
    v1, v2 = load(tmp_path, **spec).version, load(tmp_path, **spec).version
    assert v1 == v2 and len(v1) == 16
    other, _ = biomedclip_twin(tmp_path / "seed1", text_dir=tmp_path / "t1", seed=1)
    assert load(tmp_path, **{**spec, "source": str(other)}).version != v1
    resized = load(tmp_path, **spec, preprocess=PreprocessCfg(size=128)).version
    assert resized != v1
    assert load(tmp_path, **spec, version="pinned").version == "pinned"


# ---------------------------------------------------------------------------------------------------- open_clip errors
def test_missing_source(tmp_path):
    with pytest.raises(TeacherLoadError, match=r"teacher 'gone'.*does not exist"):
        load(tmp_path, name="gone", loader="open_clip", source=str(tmp_path / "nowhere"))


def test_folder_without_open_clip_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match=r"teacher 'x'.*no open_clip_config.json"):
        load(tmp_path, name="x", loader="open_clip", source=str(tmp_path / "empty"))


def test_folder_without_weights(bmc, tmp_path):
    folder, text_dir = bmc
    copy = tmp_path / "noweights"
    shutil.copytree(folder, copy)
    (copy / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(TeacherLoadError, match=r"teacher 'x'.*no weights file.*open_clip_pytorch_model.bin"):
        load(tmp_path, name="x", loader="open_clip", source=str(copy), text_model=str(text_dir))


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_corrupt_weights(name, bmc, tmp_path):
    folder, text_dir = bmc
    copy = tmp_path / "corrupt"
    shutil.copytree(folder, copy)
    (copy / "open_clip_pytorch_model.bin").unlink()
    (copy / name).write_bytes(b"\x00garbage, not a checkpoint" * 50)
    with pytest.raises(TeacherLoadError, match=rf"teacher 'x'.*{name}"):
        load(tmp_path, name="x", loader="open_clip", source=str(copy), text_model=str(text_dir))


def test_mismatched_checkpoint(bmc, tmp_path):
    folder, text_dir = bmc
    bigger, _ = biomedclip_twin(tmp_path / "bigger", text_dir=tmp_path / "bigger-text", hidden=48)
    copy = tmp_path / "mixed"
    shutil.copytree(folder, copy)
    shutil.copy(bigger / "open_clip_pytorch_model.bin", copy / "open_clip_pytorch_model.bin")
    with pytest.raises(TeacherLoadError, match=r"teacher 'x'.*does not match the architecture"):
        load(tmp_path, name="x", loader="open_clip", source=str(copy), text_model=str(text_dir))


def test_wrong_embed_dim(bmc, tmp_path):
    folder, text_dir = bmc
    with pytest.raises(TeacherLoadError, match=r"teacher 'x'.*embed_dim 512.*produces 16"):
        load(tmp_path, name="x", loader="open_clip", source=str(folder), text_model=str(text_dir), embed_dim=512)


# ---------------------------------------------------------------------------------- open_clip: checkpoint file + name
class EvilDict(collections.OrderedDict):
    """A state dict subclass: unpickling it needs this module's code, which weights_only refuses."""


class Trap:
    """Unpickling this would create `path` (a stand-in for running arbitrary code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def rn(tmp_path_factory):
    from mmkd.models.factory import create_model

    torch.manual_seed(0)
    return create_model("mmkd-teacher-rn").eval(), tmp_path_factory.mktemp("rn")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_checkpoint_file_with_config_name(fmt, rn, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from mmkd.models.factory import to_tensor

    model, _ = rn
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"rad.{fmt}"
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    enc = load(tmp_path, name="rad", loader="open_clip", source=str(path), model="mmkd-teacher-rn", embed_dim=96)
    pix = np.stack([np.asarray(im.resize((64, 64))) for im in images()])
    with torch.no_grad():
        img = F.normalize(model.encode_image(to_tensor(pix, enc.spec, CPU)), dim=-1).numpy()
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer("mmkd-teacher-rn")(TEXTS)), dim=-1).numpy()
    assert close(enc.encode_images(pix), img) and close(enc.encode_texts(TEXTS), txt)


def test_checkpoint_file_needs_model_and_fitting_context(rn, tmp_path):
    path = tmp_path / "rad.bin"
    torch.save(rn[0].state_dict(), path)
    with pytest.raises(TeacherLoadError, match=r"teacher 'rad'.*`model` must name"):
        load(tmp_path, name="rad", loader="open_clip", source=str(path))
    with pytest.raises(TeacherLoadError, match=r"teacher 'rad'.*unknown open_clip config 'no-such'"):
        load(tmp_path, name="rad", loader="open_clip", source=str(path), model="no-such")
    with pytest.raises(TeacherLoadError, match=r"teacher 'rad'.*context_length 100 exceeds the text tower's 32"):
        load(tmp_path, name="rad", loader="open_clip", source=str(path), model="mmkd-teacher-rn", context_length=100)


@pytest.mark.parametrize("payload", ["subclass", "trap"])
def test_pickled_objects_refused(payload, rn, tmp_path):
    marker = tmp_path / "code-ran"
    state = rn[0].state_dict()
    obj = EvilDict(state) if payload == "subclass" else {**state, "extra": Trap(marker)}
    path = tmp_path / "rad.bin"
    torch.save(obj, path)
    with pytest.raises(TeacherLoadError, match=r"teacher 'rad'.*not a plain tensor checkpoint"):
        load(tmp_path, name="rad", loader="open_clip", source=str(path), model="mmkd-teacher-rn")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- hf_clip (PLIP et al.)
@pytest.fixture(scope="module")
def plip(tmp_path_factory) -> Path:
    return hf_clip_twin(tmp_path_factory.mktemp("plip") / "plip")


def hf_reference(folder: Path, pil: list[Image.Image]):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=pil, return_tensors="pt"))
        txt = model.get_text_features(**proc(text=TEXTS, padding=True, return_tensors="pt"))
    feats = [x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt)]
    return [F.normalize(x, dim=-1).numpy() for x in feats]


def test_hf_clip_matches_transformers_at_model_size(plip, tmp_path):
    pil = images(((32, 32), (32, 32)))
    enc = load(tmp_path, loader="hf_clip", source=str(plip), embed_dim=16)
    img, txt = hf_reference(plip, pil)
    assert close(enc.encode_pil(pil), img) and close(enc.encode_texts(TEXTS), txt)
    assert (enc.spec.size, enc.spec.interpolation, enc.spec.resize_mode) == (32, "bicubic", "shortest")
    assert enc.max_length == 77


def test_hf_clip_matches_transformers_any_size(plip, tmp_path):
    # sizes whose centre crop offsets agree between torchvision rounding (mmkd) and transformers' floor
    pil = images(((64, 48), (40, 80), (100, 50)))
    img, _ = hf_reference(plip, pil)
    ours = load(tmp_path, loader="hf_clip", source=str(plip)).encode_pil(pil)
    # PIL (mmkd) and torchvision tensor (transformers) antialiased bicubic resizes differ by a grey level here and
    # there: ~1e-4 here, where bilinear instead of bicubic differs by ~2e-3 and squash instead of crop by ~5e-2
    assert close(ours, img, atol=3e-4)


def test_hf_clip_bin_only_and_weights_only(plip, tmp_path):
    binary = hf_clip_twin(tmp_path / "bin", safetensors=False)
    assert not (binary / "model.safetensors").exists()
    a = load(tmp_path, loader="hf_clip", source=str(plip)).encode_texts(TEXTS)
    assert close(load(tmp_path, loader="hf_clip", source=str(binary)).encode_texts(TEXTS), a)
    marker = tmp_path / "code-ran"
    state = torch.load(binary / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": Trap(marker)}, binary / "pytorch_model.bin")
    with pytest.raises(TeacherLoadError, match=r"teacher 'plip'.*not a plain tensor checkpoint"):
        load(tmp_path, name="plip", loader="hf_clip", source=str(binary))
    assert not marker.exists()


def test_hf_clip_hub_id_from_cache(plip, tmp_path, offline_empty_cache):
    fake_hub_cache(offline_empty_cache, "vinid/plip", plip)
    a = load(tmp_path, loader="hf_clip", source="vinid/plip")
    b = load(tmp_path, loader="hf_clip", source=str(plip))
    assert close(a.encode_texts(TEXTS), b.encode_texts(TEXTS)) and a.version == b.version
    with pytest.raises(TeacherLoadError, match=r"teacher 'pubmedclip'.*not in the local Hugging Face cache.*"
                                               r"`hf download flaviagiammarino/pubmed-clip-vit-base-patch32`"):
        load(tmp_path, name="pubmedclip", loader="hf_clip", source="flaviagiammarino/pubmed-clip-vit-base-patch32")


def test_hf_clip_version(plip, tmp_path):
    v1 = load(tmp_path, loader="hf_clip", source=str(plip)).version
    assert v1 == load(tmp_path, loader="hf_clip", source=str(plip)).version
    other = hf_clip_twin(tmp_path / "seed1", seed=1)
    assert load(tmp_path, loader="hf_clip", source=str(other)).version != v1


def test_hf_clip_errors(plip, tmp_path):
    from safetensors.torch import load_file, save_file

    def fails(pattern, **kw):
        with pytest.raises(TeacherLoadError, match=rf"teacher 'plip'.*{pattern}"):
            load(tmp_path, name="plip", loader="hf_clip", **kw)

    fails("does not exist", source=str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(plip, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    fails("cannot be loaded", source=str(broken))
    (broken / "model.safetensors").unlink()
    fails("no weights", source=str(broken))
    wider = hf_clip_twin(tmp_path / "wider", width=48)
    shutil.copy(wider / "model.safetensors", broken / "model.safetensors")
    fails("do not match config.json", source=str(broken))
    state = load_file(plip / "model.safetensors")
    del state["visual_projection.weight"]  # transformers would initialise it randomly and only warn
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    fails(r"do not match config.json: missing \['visual_projection.weight'\]", source=str(broken))
    bmc_cfg = tmp_path / "notclip"
    shutil.copytree(plip, bmc_cfg)
    (bmc_cfg / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fails("not a transformers CLIPModel", source=str(bmc_cfg))
    fails("embed_dim 512", source=str(plip), embed_dim=512)
    fails("context_length 100 exceeds", source=str(plip), context_length=100)


# ----------------------------------------------------------------------------------------------------------- embedded
def test_embedded_missing_checkpoint(tmp_path):
    with pytest.raises(TeacherLoadError, match=r"teacher 'rad': no checkpoint"):
        load(tmp_path, name="rad", loader="embedded", model="mmkd-teacher-rn")
