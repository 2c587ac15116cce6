"""Stage-2 ablation scored on the evaluation suite's val split, with paired CIs (never the test split).

    .venv/bin/python bench/strategies_ablation.py --root WORKSPACE [--variant NAME=KEY=VALUE,KEY=VALUE ...]
        [--baseline NAME] [--out bench/ablation/results.json]

WORKSPACE is a workspace after a default run (`make run`): its teachers, feature stores, aligned store and stage-1
student are shared by every variant, so a variant differs from another only by its `distill:` settings. Each
variant is trained with the library's `distill` (the step's own code) into WORKSPACE/artifacts/ablation/NAME
(kept: a re-run reuses a variant trained with the same settings) and scored with the promotion gate's selection
code: per val item of every single-label zero-shot set, zero-shot correctness and the correctness of a linear
probe fitted on the set's train split (C chosen by cross-validation on train, 3 head seeds). Differences are
paired bootstraps on the same stratified resamples (1000; the mean over sets as the gate's score). The teachers
and the stage-1 student are scored the same way, for the gap to the best teacher on every set.

A variant's settings are `distill:` keys (`train.epochs=16` reaches into distill.train) and `seed=N`, stage 2's seed
(the teachers, the aligned store and the stage-1 student stay the workspace's); without --variant the
four strategies run with the rest of params.yaml's distill section. `--model NAME=FOLDER` scores a student trained
elsewhere (listed first), e.g. the default run's student before `align:` changed: the variants' targets are the
workspace's current aligned store (a variant trained on another one is trained again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

STRATEGIES = ("reference", "mean", "routed", "relational")
TASKS = ("zeroshot", "probe")


def parse_variant(spec: str) -> tuple[str, dict]:
    """'name=a=1,train.epochs=16' -> ('name', {'a': 1, 'train': {'epochs': 16}}); values parsed as YAML."""
    import yaml

    name, _, rest = spec.partition("=")
    update: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        node = update
        *parents, leaf = key.strip().split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return name, update


def merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merged(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def train_variant(ctx, name: str, update: dict) -> Path:
    from mmkd import atomic
    from mmkd.config import DistillCfg
    from mmkd.steps.align import current_sets
    from mmkd.steps.common import _device
    from mmkd.training.distill import distill

    p, ws = ctx.params, ctx.ws
    update = dict(update)
    seed = int(update.pop("seed", p.seed))  # `seed=N`: stage 2's epoch order, crops, lag sample, reference's draws
    cfg = DistillCfg.model_validate(merged(p.distill.model_dump(), update))
    out = ws.root / p.paths.artifacts / "ablation" / name
    spec = {"distill": cfg.model_dump(mode="json"), "seed": seed, "stage1": _sha(ws.stage1 / "model.safetensors"),
            "aligned": _sha(ws.aligned_features / "projector" / "projector.safetensors")}  # the targets' space
    done = out / "variant.json"
    if done.exists() and json.loads(done.read_text()) == spec and (out / "model.safetensors").exists():
        print(f"[{name}] trained already ({out})", flush=True)
        return out
    domains = {s.name: list(s.modalities) for s in p.teachers.registry}
    reads_raw = cfg.strategy in ("routed", "relational") or cfg.modality_focus > 0 or cfg.sampling_focus > 0
    t0 = time.perf_counter()
    distill(ws.stage1, ws.curated, ws.aligned_features, domains, cfg, seed, _device(ctx), out,
            teacher_dir=ws.teacher_features, raw_versions=dict(current_sets(ctx)) if reads_raw else None,
            state_dir=out.parent / f".state-{name}")
    atomic.write_json(done, spec, sort_keys=True)
    print(f"[{name}] trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def score(selection, encoder, batch: int, seed: int) -> dict[str, np.ndarray]:
    return {"zeroshot": selection.outcomes(encoder, batch),
            "probe": selection.probe_outcomes(encoder, batch, seed, head_seeds=3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="a workspace after a default run")
    ap.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,KEY=VALUE (distill: keys)")
    ap.add_argument("--model", action="append", default=[],
                    help="NAME=FOLDER: a student trained elsewhere (on another aligned space: a copy of "
                         "artifacts/student), scored as a variant")
    ap.add_argument("--baseline", default=None, help="the variant the others are compared with (default: first)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: ROOT/artifacts/ablation/results.json)")
    args = ap.parse_args()

    from mmkd import atomic
    from mmkd.evaluation.stats import paired_bootstrap, plan_ci, resample_plan
    from mmkd.steps.common import Context, _device
    from mmkd.steps.evaluate import load_model
    from mmkd.steps.register import _encoder, _selection

    ctx = Context.load(args.root)
    given = dict(m.split("=", 1) for m in args.model)
    variants = [parse_variant(v) for v in args.variant] or ([] if given else [(s, {"strategy": s}) for s in STRATEGIES])
    variants = [(name, {"model": folder}) for name, folder in given.items()] + variants
    baseline = args.baseline or variants[0][0]
    selection = _selection(ctx)
    batch, seed, device = ctx.params.evaluate.batch_size, ctx.params.seed, _device(ctx)
    w, strata, sets = selection.weights, selection.strata, selection.dataset
    plan = resample_plan(selection.n, seed, strata=strata)

    outcomes: dict[str, dict[str, np.ndarray]] = {}
    for name in [s.name for s in ctx.params.teachers.registry]:
        outcomes[name] = score(selection, load_model(ctx, name)[0], batch, seed)
    outcomes["stage1"] = score(selection, _encoder("stage1", ctx.ws.stage1, device), batch, seed)
    teachers = [s.name for s in ctx.params.teachers.registry]
    settings = {}
    for name, update in variants:
        folder = Path(given[name]) if name in given else train_variant(ctx, name, update)
        settings[name] = update
        outcomes[name] = score(selection, _encoder(name, folder, device), batch, seed)

    def mean_ci(a):
        stat = lambda i: float(w[i] @ a[i])  # noqa: E731
        return [stat(np.arange(len(a))), *plan_ci(stat, plan)]

    def paired(a, b, items=None):
        if items is None:  # the gate's own comparison: weighted mean over sets, stratified by set and class
            return {k: v for k, v in selection.compare(a, b, seed, margin=0.0).items() if k != "per_set"}
        sub = resample_plan(len(items), seed, strata=strata[items])
        return paired_bootstrap(lambda i: a[items][i].mean(), lambda i: b[items][i].mean(), sub, len(items))

    result = {"root": str(args.root), "baseline": baseline, "settings": settings, "n_items": selection.n,
              "sets": [s.name for s in selection.sets], "models": {}, "vs_baseline": {}, "per_set": {}}
    for model, o in outcomes.items():
        result["models"][model] = {t: mean_ci(o[t]) for t in TASKS}
    for name, _ in variants:
        if name != baseline:
            result["vs_baseline"][name] = {t: paired(outcomes[name][t], outcomes[baseline][t]) for t in TASKS}
    for s in selection.sets:
        items = np.flatnonzero(sets == s.name)
        row = {}
        for t in TASKS:
            per_model = {m: float(o[t][items].mean()) for m, o in outcomes.items()}
            best = max(teachers, key=lambda m: per_model[m])
            row[t] = {"models": per_model, "best_teacher": best,
                      "vs_best": {name: paired(outcomes[name][t], outcomes[best][t], items) for name, _ in variants}}
        result["per_set"][s.name] = row
    out = args.out or ctx.ws.root / ctx.params.paths.artifacts / "ablation" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, result, indent=1, sort_keys=True)
    print_tables(result, [n for n, _ in variants], teachers)
    print(f"results: {out}")


def _ci(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def _diff(d) -> str:
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def print_tables(result: dict, variants: list[str], teachers: list[str]) -> None:
    print(f"\nval split, {result['n_items']} items over {len(result['sets'])} sets; mean over sets [95% CI]\n")
    print("| model | val zero-shot | val probe | zero-shot - " + result["baseline"] + " | probe - "
          + result["baseline"] + " |")
    print("|---|---|---|---|---|")
    for m in [*variants, "stage1", *teachers]:
        r = result["models"][m]
        vs = result["vs_baseline"].get(m)
        cells = [_diff(vs[t]) for t in TASKS] if vs else ["-", "-"]
        print(f"| {m} | {_ci(r['zeroshot'])} | {_ci(r['probe'])} | " + " | ".join(cells) + " |")
    for t in TASKS:
        print(f"\n{t} per set: each variant minus the set's best teacher (paired, 95% CI)\n")
        print("| set | best teacher | " + " | ".join(variants) + " |")
        print("|---|---|" + "---|" * len(variants))
        for name, row in result["per_set"].items():
            r = row[t]
            best = r["best_teacher"]
            print(f"| {name} | {best} {r['models'][best]:.3f} | "
                  + " | ".join(_diff(r["vs_best"][v]) for v in variants) + " |")


if __name__ == "__main__":
    main()
