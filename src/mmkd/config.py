"""Owns params.yaml: the pydantic schema, profile overlays and the resolved workspace paths."""

from __future__ import annotations

import collections
import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MODALITIES = (
    "xray", "ct", "mri", "ultrasound", "pathology", "dermatology", "fundus", "oct", "endoscopy",
)


class ConfigError(ValueError):
    """params.yaml is malformed; the message names the bad key."""


EMBEDDED_SUITE_DIR = Path("eval") / "embedded"  # the synthetic evaluation suite, under paths.data


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsCfg(Strict):
    data: str = "data"
    artifacts: str = "artifacts"
    reports: str = "reports"


def _known_modalities(v: list[str]) -> list[str]:
    bad = [m for m in v if m not in MODALITIES]
    if bad:
        raise ValueError(f"unknown modalities {bad}; known: {list(MODALITIES)}")
    return v


class EvalClassificationCfg(Strict):
    """Images per split of each modality's classification / retrieval set (balanced classes)."""

    train: int = Field(150, ge=3)
    val: int = Field(200, ge=3)  # selection (the gate, ablations): 40 per set was too few to choose between models
    test: int = Field(400, ge=3)


class EvalVqaCfg(Strict):
    train_images: int = Field(60, ge=2, description="per modality")
    test_images: int = Field(40, ge=2, description="per modality")
    questions_per_image: int = Field(3, ge=1, le=5)


class EvalSurvivalCfg(Strict):
    modalities: list[str] = Field(default_factory=lambda: ["pathology", "mri"])
    patients: int = Field(200, ge=10)
    images_per_patient: int = Field(3, ge=1)
    censoring: float = Field(0.3, ge=0.0, lt=1.0, description="expected share of censored patients")

    _known = field_validator("modalities")(_known_modalities)


class EvalMilCfg(Strict):
    modalities: list[str] = Field(default_factory=lambda: ["pathology", "ct"])
    bags: int = Field(160, ge=4, description="half positive")
    instances: int = Field(6, ge=2, description="per bag")

    _known = field_validator("modalities")(_known_modalities)


class EvalSuiteCfg(Strict):
    """The embedded evaluation suite synth writes under data/eval/embedded/ (never used in training)."""

    # off unless params.yaml asks: code that builds a SynthCfg for a small corpus does not also pay for the suite
    enabled: bool = False
    classification: EvalClassificationCfg = Field(default_factory=EvalClassificationCfg)
    vqa: EvalVqaCfg = Field(default_factory=EvalVqaCfg)
    survival: EvalSurvivalCfg = Field(default_factory=EvalSurvivalCfg)
    mil: EvalMilCfg = Field(default_factory=EvalMilCfg)


class SynthCfg(Strict):
    image_size: int = Field(96, ge=32, le=512)
    modalities: list[str] = Field(default_factory=lambda: list(MODALITIES))
    train_per_modality: int = Field(400, ge=4)
    probe_per_modality: int = Field(60, ge=4)
    test_per_modality: int = Field(120, ge=4)
    difficulty: float = Field(0.6, ge=0.0, le=1.0)
    workers: int = Field(2, ge=1)
    eval_suite: EvalSuiteCfg = Field(default_factory=EvalSuiteCfg)

    _known = field_validator("modalities")(_known_modalities)


COLUMN_ROLES = ("id", "image", "caption", "modality", "split", "group", "labels", "licence")


class SourceCfg(Strict):
    """One raw-data source of `curate.sources`; `kind` picks its reader (src/mmkd/data/sources/)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["synthetic", "manifest", "webdataset", "folder", "dicom", "nifti", "volume", "wsi"]
    path: str = Field(".", description="file, folder or glob; relative paths are under paths.data")
    licence: str | None = None
    modality: str | None = Field(None, description="the modality of every record (else per record / classifier)")
    split: Literal["train", "probe", "test"] | None = Field(None, description="fixed split for every record")
    # manifest: jsonl or csv (from the file suffix unless given); columns maps our field -> the file's column
    format: Literal["jsonl", "csv"] | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    label_columns: list[str] = Field(default_factory=list, description="csv columns copied into labels")
    # dicom / nifti / folder
    pattern: str | None = Field(None, description="glob under path (default per kind)")
    caption_template: str | None = Field(None, description="caption from DICOM tags / NIfTI fields when no sidecar")
    frames: Literal["middle", "first", "all"] | list[int] = "middle"
    max_frames: int = Field(8, ge=1, description="frames: all keeps at most this many, evenly spaced")
    axis: int = Field(2, ge=0, le=2, description="nifti: slicing axis in canonical (RAS) orientation; 2 = axial")
    slices: Literal["middle"] | int | list[int] = Field("middle", description="nifti: middle, N evenly spaced, or indices")
    window_percentiles: tuple[float, float] = (0.5, 99.5)
    optional: bool = Field(False, description="a missing path gives no records instead of an error (the inbox)")
    # wsi: tiles of whole-slide images (docs/formats/wsi.md)
    wsi_mpp: float = Field(0.5, gt=0, description="wsi: microns per pixel of the tiles (0.5 ~ 20x)")
    wsi_tile_px: int = Field(224, ge=16, le=4096, description="wsi: tile side in output pixels")
    wsi_tissue_fraction: float = Field(0.5, ge=0, le=1, description="wsi: least tissue share of a kept tile")
    wsi_max_tiles: int = Field(64, ge=1, description="wsi: tiles kept per slide, a seeded evenly spread choice")
    wsi_assume_mpp: float | None = Field(None, gt=0, description="wsi: level-0 mpp of slides declaring none "
                                         "(None: such slides are quarantined)")
    wsi_seed: int = Field(0, description="wsi: seed of the per-slide tile choice")
    # volume: slices of NRRD / MetaImage / NIfTI volumes and DICOM series, read with SimpleITK
    # (docs/formats/volume.md; axis, slices, pattern, caption_template and window_percentiles as for nifti)
    volume_window: Literal["dicom", "percentile"] = Field("dicom", description="volume: a DICOM series' own "
                                                          "WindowCenter/Width when it has one, else percentiles")
    volume_group_by: Literal["patient", "study"] = Field("patient", description="volume: a DICOM series' split "
                                                         "group (PatientID or StudyInstanceUID, stored as a token)")
    volume_max_bytes: int = Field(1 << 30, ge=1, description="volume: voxel bytes of a volume read whole (a "
                                  "format that cannot stream: NRRD), refused from the header above this")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(v) - set(COLUMN_ROLES))
        if bad:
            raise ValueError(f"unknown column roles {bad}; roles: {', '.join(COLUMN_ROLES)}")
        return v

    @model_validator(mode="after")
    def _listing_settings(self) -> "SourceCfg":
        # checked at load: an error while listing a source costs records (quarantined), a bad setting stops the run
        if isinstance(self.slices, int) and self.slices < 1:
            raise ValueError(f"slices must be >= 1, got {self.slices}")
        t = self.caption_template
        try:  # the fields each reader fills: any DICOM keyword (absent ones empty); nifti's four
            if t and self.kind == "dicom":
                t.format_map(collections.defaultdict(str))
            elif t and self.kind == "nifti":
                t.format(name="", axis="axial", slice=0, modality="")
            elif t and self.kind == "volume":  # nifti's four plus a DICOM series' keywords
                t.format_map(collections.defaultdict(str, name="", axis="axial", slice=0, modality=""))
            elif t and self.kind == "wsi":
                t.format(name="", mpp=0.5, x=0, y=0, modality="")
        except (KeyError, ValueError, IndexError, AttributeError) as exc:
            raise ValueError(f"bad {self.kind} caption_template {t!r}: {type(exc).__name__}: {exc}") from None
        return self


class CurateCfg(Strict):
    sources: list[SourceCfg] = Field(default_factory=lambda: [SourceCfg(name="embedded", kind="synthetic")])
    allowed_formats: list[str] = Field(default_factory=lambda: ["PNG", "JPEG", "TIFF", "BMP", "WEBP"])
    # size limits, checked from the header before any pixel is decoded
    min_side: int = Field(16, ge=1)
    max_input_side: int = Field(65_536, ge=1)
    max_pixels: int = Field(100_000_000, ge=1, description="larger images are refused as decompression bombs")
    max_side: int = Field(1024, ge=16, description="stored images are downscaled to at most this side")
    highbit_percentiles: tuple[float, float] = Field((0.0, 100.0), description="window for >8-bit images")
    # byte limits, checked by the source readers before the bytes are read or inflated (a refusal quarantines
    # the record, naming it and the limit)
    max_file_bytes: int = Field(256 * 2**20, ge=1, description="an image file or tar image member read whole")
    max_sidecar_bytes: int = Field(2**20, ge=1, description="a caption/metadata sidecar file or tar member")
    max_line_bytes: int = Field(2**20, ge=1, description="one manifest line (jsonl / csv)")
    max_inflated_bytes: int = Field(256 * 2**20, ge=1, description="a deflated DICOM dataset, inflated")
    max_header_bytes: int = Field(16 * 2**20, ge=1, description="a NIfTI header with its extensions")
    # dicom
    dicom_burned_in: Literal["refuse", "keep"] = Field("refuse", description="a DICOM whose BurnedInAnnotation is "
                                                       "YES: quarantined (burned-in text identifies) or kept")
    # the decoded fast path: square uint8 views per shard at each model input size, memory-mapped by training and
    # evaluation; a consumer whose size is not listed decodes the shards instead
    decoded_sizes: list[int] = Field(default_factory=lambda: [224])
    shard_max_bytes: int = Field(64 * 2**20, ge=2**16)
    shard_max_records: int = Field(10_000, ge=1)
    near_dup_bits: int = Field(4, ge=-1, le=16, description="pHash Hamming distance for candidates; -1 disables")
    near_dup_max_diff: float = Field(2.5, ge=0, description="confirmed when the 32x32 thumbnails differ by at most "
                                                             "this mean absolute grey level")
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "probe": 0.1, "test": 0.1})
    scrub_captions: bool = True
    # the group-token secret (mmkd.data.splits.workspace_key): filled in by the curate step, never from params.yaml,
    # never dumped or logged
    group_key: bytes | None = Field(None, exclude=True, repr=False)
    # caption bounds after scrubbing: curation quarantines what validation would refuse (the one place they live)
    min_caption_chars: int = Field(8, ge=1)
    max_caption_chars: int = Field(2000, ge=1)
    min_pixel_std: float = Field(1.0, ge=0, description="stored pixels varying less (std, 0-255) carry no "
                                                         "information: quarantined")
    workers: int = Field(2, ge=0, description="decoding processes; 0 decodes in the calling process")
    # issue 20, curation on the cluster engine (docs/scaling.md): the cluster is features.dask's, one definition for
    # both stages; neither field is in the store's fingerprint (the store is byte-identical either way)
    executor: Literal["local", "dask"] = Field("local", description="local: `workers` processes here; dask: "
                                               "partitions decoded on the features.dask cluster")
    partition_records: int = Field(256, ge=1, description="executor dask: consecutive records per work unit")
    incremental: bool = True
    check_contamination: bool = Field(True, description="after curation, look up every evaluation image on disk "
                                                        "(exact and near-duplicate) in the store: "
                                                        "artifacts/curated/contamination.json")
    durable: bool = Field(True, description="fsync each file of a new store generation before it is switched in "
                                            "(off: a killed run still leaves the store whole; a power loss may not)")

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, v: list[SourceCfg]) -> list[SourceCfg]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate source names {dup}")
        if not v:
            raise ValueError("at least one source is required")
        return v

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) - {"train", "probe", "test"} or abs(sum(v.values()) - 1.0) > 1e-6 or min(v.values()) < 0:
            raise ValueError("split_fractions: keys from train/probe/test, non-negative, summing to 1")
        return v

    @model_validator(mode="after")
    def _caption_bounds(self) -> "CurateCfg":
        if self.max_caption_chars < self.min_caption_chars:
            raise ValueError(f"max_caption_chars {self.max_caption_chars} < min_caption_chars {self.min_caption_chars}")
        return self


class ValidateCfg(Strict):
    min_split_rows: dict[str, int] = Field(default_factory=lambda: {"train": 20, "probe": 4, "test": 8})
    min_rows_per_modality: int = Field(1, ge=0, description="each expected modality needs this many train rows")
    expected_modalities: list[str] | None = Field(None, description="default: synth.modalities")
    max_unknown_fraction: float = Field(0.05, ge=0, le=1, description="share of records of modality `unknown`")
    max_contaminated_fraction: float = Field(0.0, ge=0, le=1, description="per evaluation dataset, the share of its "
                                             "images whose exact pixels are in the curated train split")
    max_near_duplicate_fraction: float = Field(0.0, ge=0, le=1, description="per evaluation dataset, the share of "
                                               "its images with a near duplicate (curation's rule) in the train split")
    fail_on_error: bool = True
    chunk_rows: int = Field(10_000, ge=1, description="manifest records per Great Expectations batch: validation "
                            "streams the manifest, so its peak memory is set by this, not by the corpus size")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, v: Any) -> Any:
        moved = [k for k in ("min_caption_chars", "max_caption_chars") if isinstance(v, dict) and k in v]
        if moved:
            raise ValueError(f"validate.{moved[0]} moved to curate.{moved[0]}: curation enforces what it validates")
        return v


class TrainCfg(Strict):
    """One CLIP-style training loop's knobs (teachers, pretraining)."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = Field(20, ge=0)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast (use on CUDA; slow on CPU)")
    augment: bool = Field(True, description="RandomResizedCrop, scale 0.9-1.0 (the reference's)")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the global gradient norm; null: off")
    accum_steps: int = Field(1, ge=1, description="micro-batches per step; the contrastive batch stays batch_size")
    grad_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% slower")
    checkpoint_every: int = Field(0, ge=0, description="write the training state every N steps (0: at the end only)")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue an unfinished run of the same config")
    log_every: int = Field(1, ge=1, description="log loss terms, lr and samples/s to MLflow every N steps")
    # issue 20 (reads beyond the page cache, feeding an accelerator): docs/training.md "Read order and prefetch"
    shuffle: Literal["global", "shards"] = Field(
        "global", description="epoch order: global (a uniform permutation) | shards (shuffled shards, a window read "
                              "together, a shuffle buffer: the WebDataset recipe, local reads on a cold store)")
    shuffle_shards: int = Field(4, ge=1, description="shards: how many shards are read together")
    shuffle_buffer: int = Field(8192, ge=1, description="shards: rows in the shuffle buffer")
    prefetch: int = Field(1, ge=0, le=4, description="batches gathered ahead in a background thread (0: inline); "
                                                      "results are identical either way")


class PreprocessCfg(Strict):
    """Image preprocessing overrides; unset fields come from the model's own config (open_clip / HF processor)."""

    size: int | None = Field(None, ge=8)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = None
    resize_mode: Literal["shortest", "longest", "squash"] | None = Field(
        None, description="shortest: resize the short side + centre crop (CLIP); longest: fit + pad; squash: stretch")


LOADERS = ("embedded", "open_clip", "hf_clip", "adapter")


class TeacherSpec(Strict):
    """One registry entry (docs/teachers.md). `loader` picks the family; `source` says where the weights are."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    loader: Literal["embedded", "open_clip", "hf_clip", "adapter"] = "embedded"
    adapter: str | None = Field(None, description="loader adapter: the bespoke family (pmc_clip, medclip, unimed_clip)")
    source: str | None = Field(None, description="hf-hub:org/name, a local folder (hub layout) or a checkpoint file; "
                                                 "embedded: default artifacts/teachers/NAME")
    model: str | None = Field(None, description="open_clip config name (embedded; open_clip with a checkpoint file)")
    text_model: str | None = Field(None, description="local folder of the Hugging Face text model (config.json + "
                                                     "tokenizer) when the checkpoint refers to a hub id")
    version: str | None = Field(None, description="teacher version for the feature store (default: hash of the weights)")
    preprocess: PreprocessCfg = PreprocessCfg()
    context_length: int | None = Field(None, ge=1)
    embed_dim: int | None = Field(None, ge=1, description="expected embedding dim; checked at load time")
    modalities: list[str] = Field(default_factory=lambda: list(MODALITIES))

    @field_validator("modalities")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in MODALITIES]
        if bad:
            raise ValueError(f"unknown modalities {bad}")
        return v

    @model_validator(mode="after")
    def _complete(self) -> "TeacherSpec":
        if self.loader == "embedded" and not self.model:
            raise ValueError(f"teacher '{self.name}': loader embedded needs `model` (an mmkd config name)")
        if self.loader in ("hf_clip", "adapter") and not self.source:
            raise ValueError(f"teacher '{self.name}': loader {self.loader} needs `source` (a local folder or hub id)")
        if self.loader == "open_clip" and not self.source and not self.model:
            raise ValueError(f"teacher '{self.name}': loader open_clip needs `source` (hf-hub:..., folder, checkpoint)")
        if self.loader == "adapter" and not self.adapter:
            raise ValueError(f"teacher '{self.name}': loader adapter needs `adapter` (e.g. pmc_clip, medclip)")
        if self.adapter and self.loader != "adapter":
            raise ValueError(f"teacher '{self.name}': `adapter` is only used with loader: adapter")
        return self


class TeacherCorpusCfg(Strict):
    """What the embedded teachers train on (docs/teachers.md: the embedded world)."""

    source: Literal["synthetic", "curated"] = Field(
        "synthetic", description="synthetic: each embedded teacher gets its own corpus from the generator, disjoint "
        "from the student's data; curated: the curated train split of its modalities (the student's own data)")
    per_modality: int = Field(600, ge=1, description="synthetic: pairs per modality of each embedded teacher's "
                                                      "corpus; must exceed synth.train_per_modality")
    per_teacher: dict[str, int] = Field(default_factory=dict, description="synthetic: teacher name -> its own "
                                        "per_modality (a generalist's corpus is thinner per modality)")
    workers: int = Field(2, ge=1, description="synthetic: rendering processes (1: in the step's process)")

    def size_for(self, teacher: str) -> int:
        """Pairs per modality of this teacher's corpus."""
        return self.per_teacher.get(teacher, self.per_modality)


class TeachersCfg(Strict):
    registry: list[TeacherSpec]
    corpus: TeacherCorpusCfg = TeacherCorpusCfg()
    train: TrainCfg = TrainCfg()

    @model_validator(mode="after")
    def _corpus_names(self) -> "TeachersCfg":
        embedded = {t.name for t in self.registry if t.loader == "embedded"}
        bad = sorted(set(self.corpus.per_teacher) - embedded)
        if bad:
            raise ValueError(f"corpus.per_teacher: {bad} not embedded teachers of the registry ({sorted(embedded)})")
        return self

    @field_validator("registry")
    @classmethod
    def _unique(cls, v: list[TeacherSpec]) -> list[TeacherSpec]:
        names = [t.name for t in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate teacher names {sorted(dup)}")
        if not v:
            raise ValueError("at least one teacher is required")
        return v


class DaskCfg(Strict):
    address: str | None = Field(None, description="scheduler of an existing Dask cluster; null: a local cluster")
    n_workers: int = Field(2, ge=1, description="local cluster: worker processes (one per GPU on a GPU node)")
    threads_per_worker: int = Field(1, ge=1)


class FeaturesCfg(Strict):
    """Teacher feature caching into the feature store (src/mmkd/features/, docs/scaling.md)."""

    batch_size: int = Field(256, ge=1)
    dtype: Literal["float16", "float32"] = Field("float32", description="storage dtype; float16 halves the disk")
    unit_records: int = Field(16384, ge=1, description="curated records per work unit = max rows of a shard")
    coverage: Literal["all", "domain"] = Field("all", description="domain: a teacher caches only train samples "
                                                                 "of its own modalities")
    decode_workers: int = Field(2, ge=1, description="threads decoding images one batch ahead of the forwards")
    executor: Literal["local", "dask"] = Field("local", description="dask: units as Prefect tasks on a Dask cluster")
    dask: DaskCfg = DaskCfg()
    prune_stale: bool = Field(True, description="drop features of teacher versions no longer in the registry")


class AlignCfg(Strict):
    """How each teacher's features are mapped into the student's space (docs/distillation.md: the shared space)."""

    method: Literal["consensus", "shared", "procrustes", "autoencoder"] = Field(
        "shared", description="consensus: per modality, orthogonal maps into the teachers' common space, then one "
        "rotation of it onto the stage-1 student; shared: orthogonal maps onto a consensus of the stage-1 student "
        "and the other teachers; procrustes: orthogonal maps onto the stage-1 student; autoencoder: the "
        "reference's projector")
    consensus_weight: float = Field(2.0, ge=0, description="shared: each other teacher's weight in the consensus "
                                    "target, the stage-1 student's being 1 (0: plain centred Procrustes)")
    iterations: int = Field(5, ge=1, description="shared: consensus refits")
    shrinkage: float = Field(0.0, ge=0, description="shared: each modality's map pulled toward the teacher's map "
                             "over all its rows (cross-covariance C_m + this * n_m / n * C_all; 0: none)")
    # autoencoder only
    hidden: int = 256
    epochs: int = Field(30, ge=1)
    batch_size: int = 256
    lr: float = 1e-3
    noise_std: float = 0.01
    dropout: float = 0.2
    anchor_weight: float = Field(0.0, ge=0, description="autoencoder: contrastive pull of each projection toward "
                                 "the stage-1 student's embedding of the pair")
    consistency_weight: float = Field(0.0, ge=0, description="autoencoder: contrastive pull between two teachers' "
                                      "projections of the same pair (teachers that declare its modality)")


class InitCfg(Strict):
    """Start the student from a local CLIP checkpoint (the reference: MetaCLIP ViT-B/16), loaded non-strictly."""

    source: str = Field(description="a weights file (.safetensors / .bin / .pt) or a hub-layout folder")
    towers: list[str] = Field(default_factory=lambda: ["visual"], description="state-dict prefixes to load")


class PretrainCfg(Strict):
    model: str = Field("mmkd-student-tiny", description="an open_clip config name (mmkd's in models/model_configs)")
    init: InitCfg | None = None
    train: TrainCfg = TrainCfg()


class DistillCfg(Strict):
    """Stage-2 distillation (docs/distillation.md): the strategy, its loss weights and temperatures."""

    train: TrainCfg = TrainCfg(epochs=3, lr=1e-4, warmup_steps=10)
    strategy: Literal["reference", "mean", "routed", "relational"] = Field(
        "reference", description="reference: one random eligible teacher per sample and step; mean: every eligible "
        "teacher, averaged; routed: teachers weighted by their probe quality on the sample's modality; relational: "
        "the teachers' in-batch similarity structure (soft-target cross entropy)")
    fd_weight: float = Field(50.0, ge=0, description="weight of FD (reference, mean, routed)")
    fd_reference_dim: int = Field(512, ge=1, description="FD = squared error summed over dims / this: fd_weight "
                                  "means what it means in the reference's 512-d recipe whatever the student's dim")
    icl_weight: float = Field(1.0, ge=0, description="weight of ICL (reference, mean, routed)")
    icl_init_temperature: float = Field(0.07, ge=0.01, le=1.0, description="initial ICL temperature (scale 1/T)")
    learn_icl_temperature: bool = True
    icl_lr: float = Field(1e-2, gt=0, description="lr of the ICL log-scale (own group, no weight decay)")
    routed_temperature: float = Field(0.05, gt=0, description="routed: softmax temperature over teacher quality")
    relational_weight: float = Field(1.0, ge=0, description="relational: weight of the similarity distillation")
    teacher_temperature: float = Field(0.07, gt=0, description="relational: teacher logits = cosine / this")
    route_by_modality: bool = True
    structure_weight: float = Field(0.0, ge=0, description="mean, routed: weight of the image-structure term (each "
                                    "teacher's ranking of a sample's same-modality batch mates, taught to the student)")
    structure_temperature: float = Field(0.05, gt=0, description="image structure: image-image cosines / this, "
                                         "teacher and student alike")
    modality_focus: float = Field(0.0, ge=0, description="mean, routed: each sample's distillation weight times "
                                  "1 + this * its modality's lag (the best declared teacher's probe quality minus "
                                  "the stage-1 student's, on the probe split), rescaled to mean 1 over the train "
                                  "split: 0 weighs every modality alike")
    sampling_focus: float = Field(0.0, ge=0, description="each epoch draws a modality's train samples in proportion "
                                  "to 1 + this * its lag (the best declared teacher's linear-probe accuracy on its "
                                  "image features minus the stage-1 student's, cross-validated on the train split's "
                                  "labelled images), the epoch keeping its length: 0 draws every sample once")

    @model_validator(mode="after")
    def _per_sample_weights_only(self) -> "DistillCfg":
        if self.structure_weight > 0 and self.strategy not in ("mean", "routed"):
            raise ValueError(f"distill.structure_weight: {self.structure_weight} needs each sample's teacher weights, "
                             f"which only the mean and routed strategies have (distill.strategy: {self.strategy}); "
                             "set distill.structure_weight to 0 for this strategy")
        if self.modality_focus > 0 and self.strategy not in ("mean", "routed"):
            raise ValueError(f"distill.modality_focus: {self.modality_focus} weighs each sample's teachers, which "
                             f"only the mean and routed strategies have (distill.strategy: {self.strategy}); "
                             "set distill.modality_focus to 0 for this strategy")
        if self.sampling_focus > 0 and self.train.shuffle != "global":
            raise ValueError(f"distill.sampling_focus: {self.sampling_focus} draws samples by weight, which only "
                             f"distill.train.shuffle: global does (it is {self.train.shuffle}); set one or the other")
        return self


class ProbeCfg(Strict):
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0])  # of the train split
    k_shots: list[int] = Field(default_factory=lambda: [1, 4, 16])  # items per class
    c_grid: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])  # chosen on val

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v) or 1.0 not in v:
            raise ValueError(f"fractions {v}: each in (0, 1], and 1.0 (the full split) among them")
        return v


class EvaluateCfg(Strict):
    # catalog names (mmkd datasets list), `embedded` (the synthetic suite) or `present` (every catalog entry
    # found under data_root); a named dataset that is missing is reported, never a failure
    datasets: list[str] = Field(default_factory=lambda: ["embedded"])
    data_root: str = "data/eval"  # real datasets, laid out as the catalog's `layout` says
    # student_stage1 (the student before distillation) gives the report its distillation gain
    models: list[str] = Field(default_factory=lambda: ["student", "student_stage1", "teachers"])
    recall_k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    probe: ProbeCfg = ProbeCfg()
    folds: int = Field(5, ge=2)  # survival and MIL: stratified K-fold cross-validation
    head_seeds: int = Field(3, ge=1)  # probe and MIL heads trained with this many seeds; scores are their mean
    batch_size: int = 256
    cache_embeddings: bool = True  # one encoding per (model, dataset); keyed by weights and image fingerprints
    # units (model, dataset) evaluated at once, in threads of the step's process, each with threads // workers
    # torch threads; results do not depend on it (each unit is seeded on its own)
    workers: int = Field(2, ge=1)

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in ("student", "student_stage1", "teachers")]
        if bad or not v:
            raise ValueError(f"unknown models {bad}: choose from student, student_stage1, teachers")
        return v


class RegisterCfg(Strict):
    """The registry and the promotion gate (mmkd.tracking.gate, mmkd.evaluation.selection).

    Every registered version gets `challenger_alias`; `champion_alias` moves to it only when, on the val split of
    the evaluated zero-shot sets (never the test split the leaderboard reports), the lower bound of the paired
    bootstrap CI of its zero-shot accuracy minus the champion's (both scored now, on the same items) is at least
    -`margin`.
    """

    model_name: str = "mmkd-student"
    challenger_alias: str = Field("challenger", min_length=1)
    champion_alias: str = Field("champion", min_length=1)
    # how much worse (accuracy, 0..1) the challenger may be at the CI's lower bound and still replace the champion
    margin: float = Field(0.01, ge=0.0, le=1.0)
    # val items scored per set, at most (a fixed random subset of a larger val split): bounds the step's time
    max_items_per_set: int = Field(250, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data):
        # the gate once compared a metrics.json path (a test-split number): selecting on test is gone, not moved
        if isinstance(data, dict) and {"metric", "higher_is_better"} & set(data):
            raise ValueError("register.metric / register.higher_is_better are retired: the gate compares val "
                             "zero-shot accuracy, paired, with register.margin (README: The promotion gate)")
        return data

    @model_validator(mode="after")
    def _distinct_aliases(self) -> "RegisterCfg":
        if self.challenger_alias == self.champion_alias:
            raise ValueError(f"challenger_alias and champion_alias must differ (both '{self.champion_alias}')")
        return self


class ServingCfg(Strict):
    """Limits on what inference decodes (mmkd.serving.limits), checked from each input's header before any pixel
    is decoded; `log_student` carries them into the registered model (its model_config), so a served model
    enforces the limits it was registered with."""

    max_pixels: int = Field(25_000_000, ge=1, description="per image, DICOM frame or NIfTI slice")
    max_image_bytes: int = Field(64 * 2**20, ge=1, description="one image's encoded bytes (a request row, a file)")
    max_decoded_bytes: int = Field(512 * 2**20, ge=1, description="what one input may inflate to: its raw "
                                                                   "pixels, all frames, a volume, a deflated DICOM")
    max_rows: int = Field(256, ge=1, description="rows per request to the served model")
    max_text_chars: int = Field(10_000, ge=1, description="one caption (the tokenizer reads all of it, then "
                                                          "keeps 77 tokens)")
    max_concurrent_decodes: int = Field(2, ge=1, description="decodes at once in one server process")


class TrackingCfg(Strict):
    experiment: str = "mmkd"
    tracking_uri: str | None = None
    # MLflow system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on every step's run
    system_metrics: bool = True
    system_metrics_interval: float = Field(10.0, gt=0)  # seconds between samples


class ScheduleCfg(Strict):
    """The Prefect deployments (prefect.yaml, rendered by `mmkd deploy`) and how their tasks retry."""

    deployment: str = "weekly-retrain"          # the retrain flow, on `cron`
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    work_pool: str = "mmkd-pool"
    evaluate_deployment: str = "evaluate"       # the evaluate flow, run on demand (no schedule)
    inbox_deployment: str = "inbox-watch"       # the inbox flow, on `inbox_cron`: retrains only when data arrived
    inbox_cron: str = "*/15 * * * *"
    # the work queue all three deployments share; `mmkd deploy --apply` creates it with concurrency limit 1, so one
    # flow run at a time works on the workspace (each deployment is also limited to 1, later runs enqueued)
    work_queue: str = "mmkd-workspace"
    # a step task that fails with a transient error (network, server unavailable, database locked) is retried
    # `retries` times after exponential backoff: retry_backoff_seconds * 2**k, +-retry_jitter of it
    retries: int = Field(2, ge=0)
    retry_backoff_seconds: float = Field(10.0, ge=0)
    retry_jitter: float = Field(0.5, ge=0)
    # a flow skips a step whose inputs, params and code are those of its last successful run (mmkd.steps.reuse);
    # `mmkd run --force` runs every step
    skip_unchanged: bool = True


class InboxCfg(Strict):
    """Data arrival: drops (a folder with manifest.jsonl or manifest.csv and its images) put in `dir`."""

    dir: str = Field("inbox", description="where drops arrive, relative to the workspace root")
    source: str = Field("inbox", description="the curate source (kind manifest, optional) the drops are added to")
    processed: str = Field("processed", description="ingested drops move here, under `dir`")


class WorkspaceCfg(Strict):
    """One writer per workspace (mmkd.workspace_lock): a pipeline run or a step run alone holds `.mmkd/lock`."""

    lock_wait_s: float = Field(10.0, ge=0, description="how long a second run waits for the holder, then fails "
                                                       "naming it")


class Params(Strict):
    profile: str = "default"
    seed: int = 0
    threads: int = Field(2, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    paths: PathsCfg = PathsCfg()
    synth: SynthCfg = SynthCfg()
    curate: CurateCfg = CurateCfg()
    validate_: ValidateCfg = Field(ValidateCfg(), alias="validate")
    teachers: TeachersCfg
    features: FeaturesCfg = FeaturesCfg()
    align: AlignCfg = AlignCfg()
    pretrain: PretrainCfg = PretrainCfg()
    distill: DistillCfg = DistillCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    register_: RegisterCfg = Field(RegisterCfg(), alias="register")
    serving: ServingCfg = ServingCfg()
    tracking: TrackingCfg = TrackingCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    inbox: InboxCfg = InboxCfg()
    workspace: WorkspaceCfg = WorkspaceCfg()
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _inbox_source(self) -> "Params":
        """Drops are appended to a manifest source, which exists before the first drop only if optional."""
        src = next((s for s in self.curate.sources if s.name == self.inbox.source), None)
        if src is not None and (src.kind != "manifest" or not src.optional or Path(src.path).suffix != ".jsonl"):
            raise ValueError(f"inbox.source: curate source '{src.name}' must be kind manifest, optional: true, "
                             f"with a .jsonl path (drops are appended to it)")
        return self

    @model_validator(mode="after")
    def _teacher_corpora(self) -> "Params":
        """An embedded teacher's own corpus is larger than the student's share of its domain (as the real ones)."""
        if self.teachers.corpus.source != "synthetic":
            return self
        share, corpus = self.synth.train_per_modality, self.teachers.corpus
        for t in self.teachers.registry:
            if t.loader != "embedded":
                continue
            n = corpus.size_for(t.name)
            if n <= share:
                key = f"teachers.corpus.per_teacher.{t.name}" if t.name in corpus.per_teacher else \
                    "teachers.corpus.per_modality"
                raise ValueError(f"{key}: {n} pairs per modality for teacher '{t.name}' must exceed "
                                 f"synth.train_per_modality ({share}): an embedded teacher's own corpus is larger "
                                 f"than the student's share of its domain")
        return self


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        # a cross-section check (no location) names its keys in the message
        lines.append(f"  {key}: {e['msg']}" if key else f"  {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """Read params.yaml, apply the chosen profile overlay, validate. Errors name the bad key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    chosen = profile or raw.get("profile", "default")
    profiles = raw.get("profiles") or {}
    if chosen != "default" and chosen not in profiles:
        raise ConfigError(f"{path}: profile '{chosen}' not in profiles {sorted(profiles)}")
    merged = deep_merge(raw, profiles.get(chosen) or {})
    merged["profile"] = chosen
    try:
        return Params.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path))) from exc


class Workspace:
    """Where every step reads and writes, resolved against one root folder."""

    def __init__(self, root: str | Path, params: Params):
        self.root = Path(root).resolve()
        self.params = params
        p = params.paths
        self.data = self.root / p.data
        self.artifacts = self.root / p.artifacts
        self.reports = self.root / p.reports

    # raw data (data.dvc)
    @property
    def raw_manifest(self) -> Path:
        return self.data / "manifest.jsonl"

    # step outputs; each step owns one folder so DVC can cache it whole
    @property
    def curated(self) -> Path:
        return self.artifacts / "curated"

    @property
    def teachers(self) -> Path:
        return self.artifacts / "teachers"

    @property
    def features(self) -> Path:
        return self.artifacts / "features"

    @property
    def teacher_features(self) -> Path:
        """The feature store of raw teacher embeddings (cache_features)."""
        return self.features / "teachers"

    @property
    def aligned_features(self) -> Path:
        """The feature store of projected, student-dimension teacher embeddings and the projector (align)."""
        return self.features / "aligned"

    @property
    def stage1(self) -> Path:
        return self.artifacts / "student_stage1"

    @property
    def student(self) -> Path:
        return self.artifacts / "student"

    def train_state(self, name: str) -> Path:
        """Resumable training state of one loop (not a DVC output: `dvc repro` must not delete it)."""
        return self.artifacts / "train_state" / name

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.json"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def leaderboard(self) -> Path:
        return self.reports / "leaderboard.md"

    @property
    def evaluation(self) -> Path:
        """Per-(model, dataset) results and the embedding cache of the evaluate step."""
        return self.artifacts / "evaluation"

    @property
    def evaluation_report(self) -> Path:
        """What the evaluation covered: its id, the missing datasets and failed units (the promotion gate reads it)."""
        return self.reports / "evaluation.json"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def eval_data(self) -> Path:
        """Real evaluation datasets (evaluate.data_root)."""
        return self.root / self.params.evaluate.data_root

    @property
    def embedded_suite(self) -> Path:
        """The synthetic evaluation suite written by synth."""
        return self.data / EMBEDDED_SUITE_DIR

    @property
    def registration(self) -> Path:
        return self.reports / "registration.json"
