"""Owns the evaluation dataset catalog: catalog.yaml's public datasets and the embedded suite, where each lives,
whether it is on disk, and loading it through its format's loader."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from mmkd.config import MODALITIES
from mmkd.evaluation.dataset import (
    SPLIT_NAMES,
    TASK_TYPES,
    DatasetFormatError,
    DatasetMissing,
    EvalDataset,
)
from mmkd.evaluation.loaders import FORMATS, IMAGE_FORMATS, LOADERS

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
SURVIVAL_MODALITIES = ("pathology", "mri")
MIL_MODALITIES = ("pathology", "ct")
STATUSES = ("present", "missing", "incomplete")
TASK_METRICS = {
    "zeroshot": ("zeroshot_acc1", "zeroshot_balanced_acc", "zeroshot_auc_macro", "zeroshot_f1_macro", "zeroshot_map"),
    "probe": ("probe_acc1", "probe_balanced_acc", "probe_auc_macro", "probe_p10_acc1", "probe_p1_acc1",
              "probe_k1_acc1", "probe_k4_acc1", "probe_k16_acc1"),
    "retrieval": ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"),
    "vqa": ("vqa_acc",),
    "survival": ("cindex_harrell", "cindex_uno"),
    "mil": ("mil_auc", "mil_balanced_acc"),
}
# the one format each of these tasks reads; zeroshot/probe/retrieval read the image formats
TASK_FORMAT = {"vqa": "vqa_json", "survival": "survival_table", "mil": "mil_bags"}
# What one split (or one cross-validation fold) keeps together, i.e. the unit that cannot leak across splits:
# patient; lesion (several images of one lesion, a patient may have several lesions); study (a scan, exam or volume);
# slide (a whole-slide image; a patient may have several); video (frames of one clip); image (the provider's split,
# by image, or grouped by something finer than a patient); hashed-file (a hash of each file's path, nothing grouped);
# single-split (one split only: nothing to leak between); synthetic (generated samples, no patients).
SPLIT_UNITS = ("patient", "lesion", "study", "slide", "video", "image", "hashed-file", "single-split", "synthetic")


class CatalogError(ValueError):
    """catalog.yaml is invalid; the message names the entry and the key."""


class Fact(BaseModel):
    """One checked fact about a dataset (licence, construction, split) and the page it was checked against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fact: str = Field(min_length=1)
    source: str = Field(pattern=r"^https?://\S+$")


def default_metrics(tasks: list[str], multilabel: bool = False) -> list[str]:
    head = {"zeroshot": ["zeroshot_auc_macro" if multilabel else "zeroshot_acc1"],
            "probe": ["probe_auc_macro" if multilabel else "probe_acc1"], "retrieval": ["i2t_r1", "t2i_r1"],
            "vqa": ["vqa_acc"], "survival": ["cindex_harrell", "cindex_uno"], "mil": ["mil_auc", "mil_balanced_acc"]}
    return [m for t in tasks for m in head[t]]


class CatalogEntry(BaseModel):
    """One evaluation dataset: what it is, where it comes from, how it is laid out and what it is scored on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    title: str = Field(min_length=1)
    modalities: list[Literal[MODALITIES]] = Field(min_length=1)
    tasks: list[Literal[TASK_TYPES]] = Field(min_length=1)
    format: Literal[tuple(FORMATS)]
    path: str = Field(min_length=1)
    options: dict[str, Any] = {}
    source: str = Field(min_length=1)
    licence: str = Field(min_length=1)
    get: str = Field(min_length=1)
    layout: str = Field(min_length=1)
    splits: list[Literal[SPLIT_NAMES]] = []  # empty: cross-validated (survival, mil)
    classes: list[str] = []
    prompts: dict[str, list[str]] = {}
    multilabel: bool = False
    metrics: list[str] = Field(min_length=1)
    embedded: bool = False
    # the unit a split keeps together (SPLIT_UNITS; not options.split_by, the column hashed); load_catalog requires
    # it of every catalog.yaml entry, None (undeclared) is for entries built in code and is flagged
    split_by: Literal[SPLIT_UNITS] | None = None
    facts: list[Fact] = []  # facts checked against the dataset's own pages, each with its URL
    _opts: BaseModel = PrivateAttr()

    @property
    def opts(self) -> Any:
        """`options` validated by the format's Options model (defaults filled in)."""
        return self._opts

    @property
    def patient_level_split(self) -> bool:
        """True when no patient can be on both sides of a split (or fold): split by patient, or synthetic."""
        return self.split_by in ("patient", "synthetic")

    @property
    def split_flagged(self) -> bool:
        """True when a patient may be on both sides of a split: the report and `mmkd datasets list` flag it
        (a single-split set has no second side)."""
        return self.split_by not in ("patient", "synthetic", "single-split")  # None (undeclared) included

    @model_validator(mode="after")
    def _consistent(self) -> CatalogEntry:
        for key in ("modalities", "tasks", "classes", "splits", "metrics"):
            vals = getattr(self, key)
            if len(set(vals)) != len(vals):
                raise ValueError(f"{key}: duplicates in {vals}")
        p = PurePosixPath(self.path)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"path: '{self.path}' must be relative to the data root, without '..'")
        for t in self.tasks:
            fmt = TASK_FORMAT.get(t)
            if (fmt and self.format != fmt) or (not fmt and self.format not in IMAGE_FORMATS):
                raise ValueError(f"tasks: '{t}' cannot be read from format '{self.format}'")
        if "retrieval" in self.tasks and self.format != "csv_manifest":
            raise ValueError("tasks: retrieval needs captions, i.e. format csv_manifest")
        needs_classes = {"zeroshot", "probe", "mil"} & set(self.tasks)
        if needs_classes and len(self.classes) < 2:
            raise ValueError(f"classes: tasks {sorted(needs_classes)} need at least 2 classes")
        if self.multilabel and (self.format == "image_folder" or not {"zeroshot", "probe"} & set(self.tasks)):
            raise ValueError("multilabel: only for zeroshot/probe datasets in csv_manifest or medmnist_npz")
        self._check_prompts()
        self._check_metrics()
        needs = {"probe": ("train", "test"), "zeroshot": ("test",), "retrieval": ("test",), "vqa": ("train", "test")}
        for t in self.tasks:
            lacking = [s for s in needs.get(t, ()) if s not in self.splits]
            if lacking:
                raise ValueError(f"splits: task '{t}' needs split(s) {lacking}")
        try:
            self._opts = FORMATS[self.format].options.model_validate(self.options)
        except ValidationError as e:
            raise ValueError("; ".join(f"options.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                       for err in e.errors())) from None
        self._check_split_by()
        return self

    def _check_split_by(self) -> None:
        # the declared unit must agree with what the options do, so the flag cannot claim more than the loader does
        if self.split_by is None:
            return
        o = self._opts  # hashed per file: a hash of each file (or manifest image cell), nothing grouped
        per_file = (o.split_dirs is None if self.format == "image_folder" else
                    self.format == "csv_manifest" and o.split_col is None and o.split_by is None)
        if self.split_by == "synthetic" and not self.embedded:
            raise ValueError("split_by: 'synthetic' is only for the embedded suite")
        if (self.split_by == "single-split") != (len(self.splits) == 1):
            raise ValueError(f"split_by: 'single-split' exactly when one split is listed (splits: {self.splits})")
        if len(self.splits) != 1 and (self.split_by == "hashed-file") != per_file:
            raise ValueError("split_by: 'hashed-file' exactly when splits are a hash of each file "
                             "(image_folder without split_dirs; csv_manifest without split_col or options.split_by)")

    def _check_prompts(self) -> None:
        if "zeroshot" not in self.tasks:
            if self.prompts:
                raise ValueError("prompts: only zero-shot datasets have prompts")
            return
        if set(self.prompts) != set(self.classes):
            raise ValueError(f"prompts: keys {sorted(self.prompts)} must be the classes {self.classes}")
        for c, ps in self.prompts.items():
            if len({q.strip() for q in ps if q.strip()}) < 2:
                raise ValueError(f"prompts.{c}: at least 2 distinct non-empty prompts per class")

    def _check_metrics(self) -> None:
        known = {m for t in self.tasks for m in TASK_METRICS[t]}
        bad = [m for m in self.metrics if m not in known]
        if bad:
            raise ValueError(f"metrics: {bad} are not metrics of tasks {self.tasks} (known: {sorted(known)})")
        for t in self.tasks:
            if not set(TASK_METRICS[t]) & set(self.metrics):
                raise ValueError(f"metrics: no headline metric for task '{t}'")
        if self.multilabel and any("acc" in m for m in self.metrics):
            raise ValueError("metrics: accuracy is not reported for multilabel datasets (use *_auc_macro)")


def _describe(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in e.errors())


def load_catalog(path: str | Path | None = None) -> list[CatalogEntry]:
    """Every entry of catalog.yaml (`datasets:` list), validated; all problems reported at once, by entry name."""
    path = Path(path or CATALOG_PATH)
    try:
        # libyaml's parser where PyYAML has it: the catalog is read once per evaluated dataset (~0.3 s in Python)
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError) as e:
        raise CatalogError(f"catalog {path}: cannot read: {e}") from e
    raw = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        raise CatalogError(f"catalog {path}: expected a top-level 'datasets:' list")
    entries, problems = [], []
    for i, item in enumerate(raw):
        name = item.get("name", "?") if isinstance(item, dict) else "?"
        try:
            entries.append(CatalogEntry.model_validate(item))
            if "split_by" not in item:
                problems.append(f"entry #{i} '{name}': split_by: required, one of {list(SPLIT_UNITS)}")
        except ValidationError as e:
            problems.append(f"entry #{i} '{name}': {_describe(e)}")
    seen: dict[str, int] = {}
    for e in entries:
        seen[e.name] = seen.get(e.name, 0) + 1
    problems += [f"entry '{n}': name: appears {k} times (names must be unique)" for n, k in seen.items() if k > 1]
    if problems:
        raise CatalogError(f"catalog {path}:\n  " + "\n  ".join(problems))
    return entries


def embedded_entries(survival_modalities=SURVIVAL_MODALITIES, mil_modalities=MIL_MODALITIES,
                     modalities=MODALITIES) -> list[CatalogEntry]:
    """The embedded suite's sets (written by synth under <paths.data>/eval/embedded/), as catalog entries:
    one classification set per modality (in MODALITIES order), the VQA set, and the survival and MIL sets."""
    from mmkd.data.synth import SPECS, zero_shot_prompts

    mods = [m for m in MODALITIES if m in modalities]
    get = "run `mmkd data synth` with synth.eval_suite.enabled: true (it writes <paths.data>/eval/embedded/)"
    common = dict(source="embedded (mmkd.data.eval_suite)", licence="CC0-1.0 (generated)", get=get, embedded=True,
                  split_by="synthetic")
    out = [CatalogEntry(name=f"embedded-{m}", title=f"Embedded synthetic {m}", modalities=[m],
                        tasks=["zeroshot", "probe", "retrieval"], format="csv_manifest", path=m,
                        layout="manifest.csv (image,label,split,caption) + images", splits=list(SPLIT_NAMES),
                        classes=list(SPECS[m].findings), prompts=zero_shot_prompts(m),
                        metrics=default_metrics(["zeroshot", "probe", "retrieval"]), **common) for m in mods]
    out.append(CatalogEntry(name="embedded-vqa", title="Embedded synthetic closed VQA", modalities=mods,
                            tasks=["vqa"], format="vqa_json", path="vqa", splits=["train", "test"],
                            layout="train.json, test.json (SLAKE fields) + imgs/",
                            metrics=default_metrics(["vqa"]), **common))
    out += [CatalogEntry(name=f"embedded-survival-{m}", title=f"Embedded synthetic {m} survival", modalities=[m],
                         tasks=["survival"], format="survival_table", path=f"survival-{m}",
                         layout="clinical.csv (patient_id,time,event) + patches/<patient_id>/",
                         metrics=default_metrics(["survival"]), **common) for m in survival_modalities]
    out += [CatalogEntry(name=f"embedded-mil-{m}", title=f"Embedded synthetic {m} MIL", modalities=[m],
                         tasks=["mil"], format="mil_bags", path=f"mil-{m}", classes=["negative", "positive"],
                         layout="labels.csv (bag_id,label) + patches/<bag_id>/",
                         metrics=default_metrics(["mil"]), **common) for m in mil_modalities]
    return out


def resolve(entry: CatalogEntry, data_root: str | Path, embedded_root: str | Path) -> Path:
    """The dataset's folder: under the embedded suite's root for embedded sets, else under evaluate.data_root."""
    return Path(embedded_root if entry.embedded else data_root) / entry.path


def status(entry: CatalogEntry, folder: str | Path) -> tuple[str, str]:
    """("present" | "missing" | "incomplete", detail) from the expected files, without loading the dataset.
    A missing dataset's detail says where it was looked for and how to get it."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing", f"looked for {folder}; to get it: {entry.get}"
    try:
        return FORMATS[entry.format].check(folder, entry)
    except DatasetMissing as e:
        return "missing", f"{e}; to get it: {entry.get}"
    except (OSError, UnicodeDecodeError, DatasetFormatError) as e:
        return "incomplete", f"{folder}: {e}"


def load_dataset(entry: CatalogEntry, folder: str | Path) -> EvalDataset:
    """The dataset through its format's loader; DatasetMissing when it is not on disk (with how to get it)."""
    folder = Path(folder)
    state, detail = status(entry, folder)
    if state == "missing":
        raise DatasetMissing(f"{entry.name}: {detail}")
    try:
        return LOADERS[entry.format](folder, entry)
    except DatasetMissing as e:
        raise DatasetMissing(f"{entry.name}: {e}; to get it: {entry.get}") from e


def suite_entries(params) -> list[CatalogEntry]:
    """The embedded suite's entries as params' synth section configures it (defaults when it has no eval_suite)."""
    suite = params.synth.eval_suite
    return embedded_entries(suite.survival.modalities, suite.mil.modalities, modalities=params.synth.modalities)


def overview(entries: list[CatalogEntry], data_root: str | Path, embedded_root: str | Path) -> list[dict]:
    """One row per entry: what it is, where it is looked for, and its status (the `mmkd datasets list` table)."""
    rows = []
    for e in entries:
        folder = resolve(e, data_root, embedded_root)
        state, detail = status(e, folder)
        detail = detail.replace("<data_root>", str(data_root)).replace("<paths.data>/eval/embedded", str(embedded_root))
        rows.append({"name": e.name, "title": e.title, "modalities": e.modalities, "tasks": e.tasks,
                     "format": e.format, "folder": str(folder), "status": state, "detail": detail,
                     "source": e.source, "licence": e.licence, "get": e.get, "embedded": e.embedded,
                     "split_by": e.split_by, "patient_level_split": e.patient_level_split,
                     "split_flagged": e.split_flagged, "facts": [f.model_dump() for f in e.facts]})
    return rows
