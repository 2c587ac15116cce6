"""The scale harness's report: the per-stage table, the curves (PNG) and the paper-scale capacity extrapolation.

    .venv/bin/python bench/scale/report.py bench/scale/results.json [--png docs/scaling_curves.png] [--workers 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = (15_000_000, 24_000_000)
# stage -> (what its time is split across at paper scale, whether the capacity table divides by the workers)
PARALLEL = {"curate": ("1 driver (de-duplicates in order) + decoding workers; measured with 2", False),
            "validate": ("1 process", False), "cache_features": ("workers or GPUs (work units)", True),
            "stage1": ("1 training process", False), "align": ("1 process", False),
            "stage2": ("1 training process", False), "encode": ("evaluate.workers (datasets)", True)}


def per_pair(stage: str, r: dict) -> float:
    """Seconds per pair of the stage's work that grows with the corpus. Training stages: setup and one epoch of
    reads per pair (the compute of a step does not depend on the corpus: see step_seconds)."""
    if stage in ("stage1", "stage2"):
        return (r["setup_seconds"] + r["read_epoch_seconds"]) / r["pairs"]
    return r["seconds"] / r["pairs"]


def table(runs: list[dict]) -> str:
    lines = ["| stage | pairs | seconds | ms / pair | peak RSS MiB | disk bytes / pair | index bytes |",
             "|---|---|---|---|---|---|---|"]
    for stage in runs[0]["stages"]:
        for run in runs:
            r = run["stages"].get(stage)
            if r is None:
                continue
            disk = f"{r['disk_bytes'] / r['pairs']:,.0f}" if "disk_bytes" in r else ""
            index = f"{r['index_bytes']:,}" if "index_bytes" in r else ""
            extra = f" (+ {r['step_seconds']:.2f} s / step of {r['batch']})" if "step_seconds" in r else ""
            lines.append(f"| {stage} | {r['pairs']:,} | {r['seconds']:.1f} | {per_pair(stage, r) * 1e3:.3f}{extra} | "
                         f"{r['hwm_kib'] / 1024:.0f} | {disk} | {index} |")
    lo, hi = runs[0], runs[-1]
    lines += ["", f"| stage | time / pair, {hi['n']:,} vs {lo['n']:,} | peak RSS, {hi['n']:,} vs {lo['n']:,} |",
              "|---|---|---|"]
    for stage in lo["stages"]:
        if stage in hi["stages"]:
            a, b = lo["stages"][stage], hi["stages"][stage]
            lines.append(f"| {stage} | {per_pair(stage, b) / per_pair(stage, a):.2f}x | "
                         f"{b['hwm_kib'] / a['hwm_kib']:.2f}x |")
    return "\n".join(lines)


def capacity(runs: list[dict], workers: int) -> str:
    """Hours, disk and RAM at TARGETS from the slopes between the two largest measured sizes."""
    a, b = runs[-2], runs[-1]
    lines = ["| stage | parallel over | s / pair (slope) | " + " | ".join(
        f"hours at {t / 1e6:g} M, 1 / {workers} workers" for t in TARGETS)
        + " | peak RSS GiB: measured at the largest size / linear to 24 M |",
        "|---|---|---|" + "---|" * len(TARGETS) + "---|"]
    for stage in b["stages"]:
        ra, rb = a["stages"][stage], b["stages"][stage]
        work = lambda r: per_pair(stage, r) * r["pairs"]  # noqa: E731
        slope = (work(rb) - work(ra)) / (rb["pairs"] - ra["pairs"])
        frac = rb["pairs"] / b["n"]  # the stage's pairs per corpus pair (train split: 0.8, test: 0.1)
        hours = [slope * frac * t / 3600 for t in TARGETS]
        par = workers if PARALLEL[stage][1] else 1
        rss = rb["hwm_kib"] + max(0, rb["hwm_kib"] - ra["hwm_kib"]) / (b["n"] - a["n"]) * (TARGETS[-1] - b["n"])
        lines.append(f"| {stage} | {PARALLEL[stage][0]} | {slope:.2e} | " + " | ".join(
            f"{h:.1f} / {h / par:.1f}" for h in hours) + f" | {rb['hwm_kib'] / 2**20:.2f} / {rss / 2**20:.1f} |")
    disk = {"source images": b["source_bytes"] / b["n"],
            "curated store": b["stages"]["curate"]["disk_bytes"] / b["n"],
            "teacher features": b["stages"]["cache_features"]["disk_bytes"] / b["n"],
            "aligned features": b["stages"]["align"]["disk_bytes"] / b["n"]}
    lines += ["", "| on disk | bytes / pair | " + " | ".join(f"GB at {t / 1e6:g} M" for t in TARGETS) + " |",
              "|---|---|" + "---|" * len(TARGETS)]
    for k, v in disk.items():
        lines.append(f"| {k} | {v:,.0f} | " + " | ".join(f"{v * t / 1e9:,.0f}" for t in TARGETS) + " |")
    return "\n".join(lines)


def curves(runs: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ns = [r["n"] for r in runs]
    for stage in runs[0]["stages"]:
        have = [r for r in runs if stage in r["stages"]]
        ax1.plot([r["n"] for r in have], [per_pair(stage, r["stages"][stage]) * 1e3 for r in have], "o-", label=stage)
        ax2.plot([r["n"] for r in have], [r["stages"][stage]["hwm_kib"] / 1024 for r in have], "o-", label=stage)
    for ax, title in ((ax1, "time per pair (ms; training stages: setup + one epoch of reads)"),
                      (ax2, "peak RSS of the stage's process (MiB)")):
        ax.set_xscale("log")
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.set_xlabel("pairs generated")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax2.legend(fontsize=8)
    fig.suptitle("scale harness (bench/scale), measured on this machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    runs = sorted(json.loads(args.results.read_text()), key=lambda r: r["n"])
    print(table(runs))
    if len(runs) >= 2:
        print()
        print(capacity(runs, args.workers))
    if args.png:
        curves(runs, args.png)


if __name__ == "__main__":
    main()
