"""How much of each teacher's linear-probe accuracy survives the student's input resolution (val split only).

    .venv/bin/python bench/input_resolution.py --root WORKSPACE [--sizes 40 48 56] [--out FILE.json]

A teacher that reads larger images than the student sees details the student never receives. This scores every
teacher on the val items of each zero-shot set of its declared modalities with the promotion gate's probe (fitted
on the set's train split, C by cross-validation on train, 3 head seeds), once at its own input size and once per
size in --sizes (default: the student's): each image is first resized to that size (bicubic, the students'
interpolation), then prepared by the teacher as usual (resized back up to its own size), so that the teacher
gets exactly the information a student of that size gets, in the format it was trained on. The stage-1 student
is scored too. The drop (own size minus the student's) bounds what distillation can carry over at that size only
loosely: a teacher trained on small images could read them better than this one, which never saw any.

WORKSPACE is a workspace after a default run (`make run`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class AtSize:
    """An encoder whose images are first resized to `size` (bicubic), then prepared by the wrapped encoder."""

    def __init__(self, encoder, size: int):
        self.inner, self.size = encoder, size
        self.name, self.spec, self.device = f"{encoder.name}@{size}", encoder.spec, encoder.device

    @property
    def embed_dim(self) -> int:
        return self.inner.embed_dim

    def encode_pil(self, images, batch_size: int = 256) -> np.ndarray:
        from PIL import Image

        def small(im):
            im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
            return im.resize((self.size, self.size), Image.BICUBIC)

        return self.inner.encode_pil([small(im) for im in images], batch_size)

    def encode_texts(self, texts, batch_size: int = 512) -> np.ndarray:
        return self.inner.encode_texts(texts, batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="a workspace after a default run")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="input sizes (default: the student's)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: print only)")
    args = ap.parse_args()

    from mmkd import atomic
    from mmkd.steps.common import Context, _device
    from mmkd.steps.evaluate import load_model
    from mmkd.steps.register import _encoder, _selection

    ctx = Context.load(args.root)
    device, batch, seed = _device(ctx), ctx.params.evaluate.batch_size, ctx.params.seed
    selection = _selection(ctx)
    stage1 = _encoder("stage1", ctx.ws.stage1, device)
    sizes = args.sizes or [stage1.spec.size]
    per_set = selection.per_set(np.zeros(selection.n))  # only for the set names, in order
    result: dict = {"root": str(args.root.resolve()), "student_size": stage1.spec.size, "sizes": sizes, "sets": {}}
    models = [(s.name, list(s.modalities)) for s in ctx.params.teachers.registry] + [("stage1", None)]
    for name, modalities in models:
        encoder = stage1 if name == "stage1" else load_model(ctx, name)[0]
        views = {encoder.spec.size: encoder, **{z: AtSize(encoder, z) for z in sizes if z != encoder.spec.size}}
        scored = {z: selection.per_set(selection.probe_outcomes(e, batch, seed, head_seeds=3))
                  for z, e in views.items()}
        for set_name in per_set:
            if modalities is not None and not any(set_name.endswith(f"-{m}") for m in modalities):
                continue
            row = {"own_size": encoder.spec.size, **{str(z): float(scored[z][set_name]) for z in scored}}
            result["sets"].setdefault(set_name, {})[name] = row
            cells = ", ".join(f"{z} px {v[set_name]:.3f}" for z, v in sorted(scored.items()))
            print(f"{set_name:24s} {name:10s} {cells}", flush=True)
    if args.out:
        atomic.write_json(args.out, result, sort_keys=True)
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
