"""The stage-2 strategy ablation: `dvc exp run -S distill.strategy=S` for each strategy, then one table.

    .venv/bin/python bench/strategies_ablation.py [--strategies reference,mean,routed,relational] [--table-only]

Each experiment re-runs only what the strategy changes (distill, evaluate, register) on the committed
workspace; DVC keeps the experiments as git refs (`dvc exp show`), which this script reads back with
`dvc exp show --json`. Commit the printed table (docs/benchmarks.md), not the experiments.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

ROWS = (("mean zero-shot acc1", ("mean", "zeroshot_acc1")), ("mean probe acc1", ("mean", "probe_acc1")),
        ("mean i2t R@1", ("mean", "i2t_r1")), ("pathology probe", ("pathology-finding", "probe_acc1")),
        ("ct probe", ("ct-finding", "probe_acc1")), ("pathology zero-shot", ("pathology-finding", "zeroshot_acc1")))


def run(strategy: str) -> None:
    cmd = ["dvc", "exp", "run", "--temp", "--name", f"strategy-{strategy}", "-S", f"distill.strategy={strategy}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def metrics_of_experiments() -> dict[str, dict]:
    out = subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True).stdout
    found = {}
    for commit in json.loads(out):
        for exp in [commit, *[e for e in (commit.get("experiments") or [])]]:
            revs = exp.get("revs") if "revs" in exp else [exp]
            for rev in revs:
                name = rev.get("name") or ""
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("reports/metrics.json", {}).get("data")
                if name.startswith("strategy-") and metrics:
                    found[name.removeprefix("strategy-")] = metrics
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="reference,mean,routed,relational")
    ap.add_argument("--table-only", action="store_true", help="only read the experiments back")
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    if not args.table_only:
        for s in strategies:
            run(s)
    found = metrics_of_experiments()
    missing = [s for s in strategies if s not in found]
    if missing:
        sys.exit(f"no experiment results for {missing}")
    print("| metric (student) | " + " | ".join(strategies) + " | stage 1 only |")
    print("|---|" + "---|" * (len(strategies) + 1))
    for label, (dataset, metric) in ROWS:
        cells = [found[s]["student"].get(dataset, {}).get(metric, float("nan")) for s in strategies]
        stage1 = found[strategies[0]]["student_stage1"].get(dataset, {}).get(metric, float("nan"))
        print(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {stage1:.3f} |")


if __name__ == "__main__":
    main()
