"""Bench: the evaluate step with an empty embedding cache vs a filled one, side by side in one process.

What the cache buys: a re-evaluation (a new task, new task settings, a re-run) re-uses every (model, dataset)
embedding whose weights and images are unchanged. Runs the step (in-process units) on the workspace's
current models and evaluation suite, three times: cold (cache emptied), warm, and cold again, and prints the
wall times and the warm/cold ratio. Usage: .venv/bin/python bench/evaluation_cache.py [--root .]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from mmkd.steps import Context, run_step


def timed(ctx: Context, cold: bool) -> tuple[float, dict]:
    if cold:
        shutil.rmtree(ctx.ws.evaluation / "embeddings", ignore_errors=True)
    t0 = time.perf_counter()
    run_step("evaluate", ctx)
    seconds = time.perf_counter() - t0
    units = [json.loads(p.read_text()) for p in (ctx.ws.evaluation / "results").glob("*/*.json")]
    parts = {"embed_seconds": round(sum(u.get("embed_seconds", 0) for u in units), 1),
             "task_seconds": round(sum(sum(u.get("task_seconds", {}).values()) for u in units), 1),
             "cached_units": sum(bool(u.get("embeddings_cached")) for u in units), "units": len(units)}
    return seconds, parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=".")
    args = ap.parse_args()
    ctx = Context.load(args.root)
    rows = []
    for label, cold in (("cold", True), ("warm", False), ("cold", True)):
        seconds, parts = timed(ctx, cold)
        rows.append((label, seconds, parts))
        print(f"{label}: {seconds:.1f} s  {parts}", flush=True)
    cold_mean = (rows[0][1] + rows[2][1]) / 2
    print(f"warm / cold (mean of the two cold runs): {rows[1][1] / cold_mean:.3f}")


if __name__ == "__main__":
    main()
