"""Shared-space candidates compared on a held-out fifth of the train split (never the probe split the align step
reports its diagnostic on, never the test split).

    .venv/bin/python bench/align_candidates.py --root WORKSPACE [--candidate NAME=KEY=VALUE,... ...]

WORKSPACE is a workspace after a default run (its raw teacher feature store and stage-1 student). The train split
is cut by a seeded permutation into a fit part (4/5) and a held-out part (1/5); every candidate's maps are fitted
on the fit part with the library's `fit_maps` and measured on the held-out part with the step's diagnostic
(`features.diagnostics.shared_space`: per teacher pair sharing a modality, the centred same-sample minus
shuffled cosine, `gap`, and the nearest-neighbour rate). The Procrustes baseline is fitted and measured the same
way. Prints, per pair, each candidate's gap and its margin over the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from strategies_ablation import parse_variant  # noqa: E402 (bench/ is the script's folder, first on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--candidate", action="append", default=[], help="NAME=KEY=VALUE,... (align: keys)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from mmkd.features import diagnostics
    from mmkd.features.align import Streamed
    from mmkd.features.projector import fit_maps
    from mmkd.features.store import FeatureStore
    from mmkd.features.student import InMemory, student_embeddings
    from mmkd.steps.align import _split, current_sets
    from mmkd.steps.common import Context, _device

    ctx = Context.load(args.root)
    p, ws = ctx.params, ctx.ws
    records, train = _split(ctx, "train")
    with tempfile.TemporaryDirectory() as scratch:
        rows = student_embeddings(ws.stage1, ws.curated, records, _device(ctx), Path(scratch))
        student = rows.rows(np.arange(len(rows)))
        rows.close()
    perm = np.random.default_rng(p.seed).permutation(len(train.keys))
    held, fit = np.sort(perm[: len(perm) // 5]), np.sort(perm[len(perm) // 5:])
    domains = {s.name: list(s.modalities) for s in p.teachers.registry}
    raw = FeatureStore(ws.teacher_features)
    sets = current_sets(ctx)
    source_fit = Streamed(raw, sets, train.keys[fit])
    source_held = Streamed(raw, sets, train.keys[held])
    parts = source_held.batch(np.arange(len(held)))
    available = {t: np.asarray(source_held.available[:, j], bool) for j, t in enumerate(source_held.names)}
    candidates = [("procrustes", {"method": "procrustes"})] + [parse_variant(c) for c in args.candidate]
    result = {}
    for name, update in candidates:
        cfg = p.align.model_copy(update=update)
        maps = fit_maps(source_fit, InMemory(student[0][fit], student[1][fit]), train.modality[fit], domains,
                        cfg.method, cfg)
        images = {t: maps.project(t, torch.from_numpy(np.asarray(parts[t][0])),
                                  train.modality[held]).numpy() for t in source_held.names}
        rows_ = diagnostics.shared_space(images, available, train.modality[held], domains, p.seed)
        result[name] = {"settings": update, "pairs": rows_, "summary": diagnostics.summary(rows_)}
        print(f"[{name}] gap min {result[name]['summary']['gap_min']:+.3f} mean "
              f"{result[name]['summary']['gap_mean']:+.3f}", flush=True)
    raw.close()
    base = {f"{r['modality']} {r['pair']}": r["gap"] for r in result["procrustes"]["pairs"] if "gap" in r}
    names = [n for n, _ in candidates]
    print(f"\nheld-out fifth of train ({len(held)} pairs); gap = centred same - shuffled cosine\n")
    print("| pair | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in base:
        cells = []
        for n in names:
            g = next(r["gap"] for r in result[n]["pairs"] if f"{r['modality']} {r['pair']}" == key)
            cells.append(f"{g:+.2f}" if n == "procrustes" else f"{g:+.2f} ({g - base[key]:+.2f})")
        print(f"| {key} | " + " | ".join(cells) + " |")
    worst = {n: min(next(r["gap"] for r in result[n]["pairs"] if f"{r['modality']} {r['pair']}" == k) - base[k]
                    for k in base) for n in names}
    print("| worst margin over procrustes | " + " | ".join(f"{worst[n]:+.2f}" for n in names) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"held_out": int(len(held)), "fit": int(len(fit)), "candidates": result,
                                        "worst_margin": worst}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
