"""Owns the `mmkd` command line: data generation, single steps (DVC's entry point), the flow and deployment."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from mmkd.config import ConfigError

app = typer.Typer(add_completion=False, help="MMKD-CLIP: distil several biomedical CLIP teachers into one student.")
data_app = typer.Typer(help="Raw data (the DVC-tracked data/ folder).")
app.add_typer(data_app, name="data")
features_app = typer.Typer(help="The teacher feature store (artifacts/features/).")
app.add_typer(features_app, name="features")
datasets_app = typer.Typer(help="Evaluation datasets: the catalog and what of it is on disk.")
app.add_typer(datasets_app, name="datasets")

RootOpt = typer.Option(Path("."), "--root", help="workspace root (holds params.yaml, data/, artifacts/, reports/)")
ParamsOpt = typer.Option(None, "--params", help="parameters file (default: ROOT/params.yaml)")
ProfileOpt = typer.Option(None, "--profile", help="profile overlay from params.yaml (e.g. smoke, default)")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmkd").setLevel(logging.INFO)


def _context(root: Path, params: Optional[Path], profile: Optional[str]):
    from mmkd.steps import Context

    try:
        return Context.load(root, params, profile)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)


@data_app.command("synth")
def data_synth(root: Path = RootOpt, params: Optional[Path] = ParamsOpt, profile: Optional[str] = ProfileOpt,
               if_missing: bool = typer.Option(False, "--if-missing", help="only what is missing: nothing when data/ and its evaluation suite exist, the suite alone when only it is missing")):
    """Generate the embedded synthetic corpus (PNGs, manifest.jsonl, tasks.json) and its evaluation suite (data/eval/embedded/)."""
    _setup_logging()
    from mmkd.steps import run_step
    from mmkd.steps.synth import suite_missing

    ctx = _context(root, params, profile)
    if if_missing and ctx.ws.raw_manifest.exists() and not suite_missing(ctx):
        typer.echo(f"{ctx.ws.raw_manifest} and the evaluation suite exist; not regenerating")
        return
    typer.echo(json.dumps(run_step("synth", ctx)["summary"]))


@data_app.command("report")
def data_report(root: Path = RootOpt, params: Optional[Path] = ParamsOpt, profile: Optional[str] = ProfileOpt):
    """Counts of the curated store per source, modality and split, and the quarantine reasons."""
    from mmkd.data.report import curation_report

    ctx = _context(root, params, profile)
    try:
        typer.echo(curation_report(ctx.ws.curated))
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1)


@features_app.command("stats")
def features_stats(root: Path = RootOpt, params: Optional[Path] = ParamsOpt, profile: Optional[str] = ProfileOpt,
                   as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Coverage of each curated split per teacher, rows, shards and size on disk of the feature stores."""
    import numpy as np

    from mmkd.data.splits import SPLITS
    from mmkd.data.store import split_records
    from mmkd.features.store import FeatureError, FeatureStore

    ctx = _context(root, params, profile)
    keys = {}
    if (ctx.ws.curated / "manifest.jsonl").exists():
        keys = {s: np.array([r["key"] for r in split_records(ctx.ws.curated, s)], dtype="S32") for s in SPLITS}
    out = {}
    for label, folder in (("teachers", ctx.ws.teacher_features), ("aligned", ctx.ws.aligned_features)):
        try:
            store = FeatureStore(folder)
        except FeatureError as exc:
            out[label] = {"error": str(exc)}
            continue
        out[label] = store.stats(keys)
        store.close()
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    for label, st in out.items():
        if "error" in st:
            typer.echo(f"{label}: {st['error']}")
            continue
        typer.echo(f"{label} store {st['root']}: {st['shards']} shards, {st['bytes'] / 2**20:.1f} MiB")
        typer.echo("  teacher          version                       dim  dtype     rows  shards  MiB    "
                   + "  ".join(f"{s:>6}" for s in keys))
        for e in st["sets"]:
            cov = "  ".join(f"{e['coverage'][s]:>6.1%}" for s in keys) if keys else ""
            typer.echo(f"  {e['teacher']:<16} {e['version']:<29} {e['dim']:>4} {e['dtype']:<8} {e['rows']:>6} "
                       f"{e['shards']:>6} {e['bytes'] / 2**20:>6.1f}  {cov}")


@datasets_app.command("list")
def datasets_list(root: Path = RootOpt, params: Optional[Path] = ParamsOpt, profile: Optional[str] = ProfileOpt,
                  verbose: bool = typer.Option(False, "--verbose", "-v", help="full instructions for missing sets"),
                  as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Every evaluation dataset (embedded suite + catalog.yaml): modalities, tasks, format, on-disk status."""
    from mmkd.evaluation.catalog import CatalogError, load_catalog, overview, suite_entries

    ctx = _context(root, params, profile)
    data_root, embedded_root = ctx.ws.eval_data, ctx.ws.embedded_suite
    try:
        rows = overview(suite_entries(ctx.params) + load_catalog(), data_root, embedded_root)
    except CatalogError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps({"data_root": str(data_root), "embedded_root": str(embedded_root), "datasets": rows},
                              indent=1))
        return
    typer.echo(f"{'name':<28} {'modalities':<26} {'tasks':<24} {'format':<15} status")
    for r in rows:
        mods = ",".join(r["modalities"])
        mods = mods if len(mods) <= 26 else f"{len(r['modalities'])} modalities"
        typer.echo(f"{r['name']:<28} {mods:<26} {','.join(r['tasks']):<24} {r['format']:<15} {r['status']}")
        if r["status"] != "present":
            where, _, get = r["detail"].partition("; to get it: ")
            typer.echo(f"    {where}")
            if get:
                short = verbose or len(get) <= 140
                typer.echo(f"    get: {get if short else get[:140].rstrip() + '... (--verbose: all of it)'}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("present", "missing", "incomplete")}
    typer.echo(f"{len(rows)} datasets: " + ", ".join(f"{n} {s}" for s, n in counts.items())
               + f" (data_root {data_root}, embedded suite {embedded_root})")


@app.command("stage")
def stage(name: str = typer.Argument(..., help="curate|validate|teachers|cache_features|align|pretrain|distill|evaluate|register"),
          root: Path = RootOpt, params: Optional[Path] = ParamsOpt, profile: Optional[str] = ProfileOpt):
    """Run one pipeline step (what each DVC stage calls)."""
    _setup_logging()
    from mmkd.steps import PIPELINE, run_step

    if name not in PIPELINE:
        typer.echo(f"unknown stage '{name}'; stages: {', '.join(PIPELINE)}", err=True)
        raise typer.Exit(2)
    ctx = _context(root, params, profile)
    if name == "cache_features" and ctx.params.features.executor == "dask":
        from tasks.cache_features import cache_features  # units on a Dask cluster through Prefect's task runner

        result = cache_features(str(ctx.ws.root), str(ctx.params_path), ctx.params.profile, ctx.parent_run_id)
    else:
        result = run_step(name, ctx)
    typer.echo(json.dumps({"step": name, "seconds": result["seconds"], "run_id": result["run_id"]}))


@app.command("evaluate")
def evaluate(datasets: Optional[str] = typer.Option(
                 None, "--datasets", help="comma-separated catalog names, `embedded` or `present` (default: "
                                          "evaluate.datasets); missing ones are reported, not errors"),
             models: Optional[str] = typer.Option(None, "--models", help="student,student_stage1,teachers"),
             reports: Optional[Path] = typer.Option(None, "--reports", help="write the reports here instead of "
                                                    "paths.reports (keeps the pipeline's metrics.json as it is)"),
             root: Path = RootOpt, params: Optional[Path] = ParamsOpt, profile: Optional[str] = ProfileOpt):
    """Evaluate the students and teachers on the selected datasets: six task types, 95% CIs, a leaderboard."""
    _setup_logging()
    from mmkd.config import Workspace
    from mmkd.steps import Context, run_step

    ctx = _context(root, params, profile)
    p = ctx.params
    update = {}
    if datasets:
        update["datasets"] = [d.strip() for d in datasets.split(",") if d.strip()]
    if models:
        update["models"] = [m.strip() for m in models.split(",") if m.strip()]
    try:
        evaluate_cfg = type(p.evaluate).model_validate({**p.evaluate.model_dump(), **update})
    except Exception as exc:
        typer.echo(f"mmkd evaluate: {exc}", err=True)
        raise typer.Exit(2)
    paths = p.paths.model_copy(update={"reports": str(reports.resolve())}) if reports else p.paths
    ctx = Context(Workspace(ctx.ws.root, p.model_copy(update={"evaluate": evaluate_cfg, "paths": paths})),
                  ctx.params_path, ctx.parent_run_id)
    try:
        result = run_step("evaluate", ctx)
    except (KeyError, FileNotFoundError) as exc:
        typer.echo(f"mmkd evaluate: {exc}", err=True)
        raise typer.Exit(2)
    s = result["summary"]
    for name, why in s["missing"].items():
        typer.echo(f"missing: {name}: {why}", err=True)
    for unit, why in s["failed"].items():
        typer.echo(f"failed: {unit}: {why}", err=True)
    typer.echo("\n" + ctx.ws.leaderboard.read_text())
    typer.echo(f"{s['units']} units in {s['seconds']} s; reports in {ctx.ws.reports}")


@app.command("run")
def run(profile: Optional[str] = ProfileOpt, root: Path = RootOpt, params: Optional[Path] = ParamsOpt):
    """Run the whole `retrain` Prefect flow: curate -> ... -> register."""
    _setup_logging()
    ctx = _context(root, params, profile)  # fail fast on bad params, before Prefect starts
    from flows.retrain import retrain  # flows/ and tasks/ are installed beside mmkd (pyproject.toml)

    result = retrain(profile=ctx.params.profile, root=str(ctx.ws.root), params_path=str(ctx.params_path))
    ws = ctx.ws
    typer.echo("\n" + ws.leaderboard.read_text())
    typer.echo(f"metrics:      {ws.metrics}\nleaderboard:  {ws.leaderboard}\nData Docs:    {ws.reports / 'data_docs' / 'index.html'}")
    reg = result["registration"]
    typer.echo(f"model:        {reg['model_uri']} (tracking {reg['tracking_uri']})")
    typer.echo(f"gate:         {'promoted to' if reg['promoted'] else 'not promoted to'} {reg['champion_alias']}: "
               f"{reg['reason']}; {reg['champion_uri']} is v{reg['champion_version']}")
    typer.echo("MLflow UI:    bash mlflow_server/start.sh   then open http://127.0.0.1:5000")
    typer.echo(f"wall time:    {result['seconds']:.0f} s")


@app.command("deploy")
def deploy(root: Path = RootOpt, params: Optional[Path] = ParamsOpt,
           check: bool = typer.Option(False, "--check", help="exit 1 if prefect.yaml differs from params.yaml")):
    """Write prefect.yaml (the scheduled `retrain` deployment) from params.yaml's `schedule` section."""
    from mmkd.deployment import render_prefect_yaml

    ctx = _context(root, params, None)
    text = render_prefect_yaml(ctx.params)
    target = ctx.ws.root / "prefect.yaml"
    if check:
        if not target.exists() or target.read_text() != text:
            typer.echo(f"{target} is out of date with params.yaml; run `mmkd deploy`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{target} matches params.yaml")
        return
    target.write_text(text)
    typer.echo(f"wrote {target}; then: prefect work-pool create {ctx.params.schedule.work_pool} --type process && "
               f"prefect deploy --all && prefect worker start --pool {ctx.params.schedule.work_pool}")


if __name__ == "__main__":
    app()
