"""`mmkd data`, `mmkd features`, `mmkd datasets`: the raw data, the feature store and the evaluation catalog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mmkd.cli.common import (
    ParamsOpt,
    ProfileOpt,
    RootOpt,
    _context,
    _setup_logging,
    exit_when_busy,
    data_app,
    datasets_app,
    features_app,
)


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
    with exit_when_busy("mmkd data synth"):
        summary = run_step("synth", ctx)["summary"]
    typer.echo(json.dumps(summary))


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
    from mmkd.data.splits import SPLITS
    from mmkd.data.split_table import SplitTable
    from mmkd.features.store import FeatureError, FeatureStore

    ctx = _context(root, params, profile)
    keys = {}
    if (ctx.ws.curated / "manifest.jsonl").exists():
        keys = {s: SplitTable(ctx.ws.curated, s).keys for s in SPLITS}  # columns: no record dicts
    out = {}
    for label, folder in (("teachers", ctx.ws.teacher_features), ("aligned", ctx.ws.aligned_features)):
        try:
            store = FeatureStore(folder)
        except FeatureError as exc:
            out[label] = {"error": str(exc)}
            continue
        out[label] = store.stats(keys)
        store.close()
    space_path = ctx.ws.aligned_features / "diagnostics.json"
    if space_path.exists():  # the align step's measure of the shared space (features.diagnostics)
        out["space"] = json.loads(space_path.read_text())
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    for label in ("teachers", "aligned"):
        st = out[label]
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
    if "space" in out:
        _print_space(out["space"])


def _print_space(space: dict) -> None:
    """The shared-space diagnostic: centred same-sample vs shuffled cosine and nearest-neighbour rate per pair."""
    from mmkd.features.diagnostics import format_rows

    typer.echo(f"shared space ({space['method']}, {space['split']} split; cosines with each modality's mean removed):")
    for line in format_rows(space["aligned"]["pairs"]):
        typer.echo(line)
    if "procrustes" in space:
        gaps = [f"{r['modality']} {r['pair']} {r['gap']:+.3f}"
                for r in space["procrustes"]["pairs"] if r.get("gap") is not None]
        typer.echo("  Procrustes baseline gap: " + "; ".join(gaps))
    typer.echo("  teachers' probe quality (nearest caption prototype, balanced): "
               + "; ".join(f"{t} {q:.3f} (raw {space['raw_quality'][t]:.3f})"
                           for t, q in space["aligned"]["quality"].items()))


@datasets_app.command("list")
def datasets_list(root: Path = RootOpt, params: Optional[Path] = ParamsOpt, profile: Optional[str] = ProfileOpt,
                  verbose: bool = typer.Option(False, "--verbose", "-v", help="full instructions for missing sets"),
                  as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Every evaluation dataset (embedded suite + catalog.yaml): modalities, tasks, format, on-disk status."""
    from mmkd.evaluation.catalog import (
        CatalogError,
        load_catalog,
        overview,
        suite_entries,
    )

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
    typer.echo(f"{'name':<28} {'modalities':<26} {'tasks':<24} {'format':<15} {'split by':<13} status")
    for r in rows:
        mods = ",".join(r["modalities"])
        mods = mods if len(mods) <= 26 else f"{len(r['modalities'])} modalities"
        split = (r["split_by"] or "undeclared") + ("*" if r["split_flagged"] else "")
        typer.echo(f"{r['name']:<28} {mods:<26} {','.join(r['tasks']):<24} {r['format']:<15} {split:<13} "
                   f"{r['status']}")
        if r["status"] != "present":
            where, _, get = r["detail"].partition("; to get it: ")
            typer.echo(f"    {where}")
            if get:
                short = verbose or len(get) <= 140
                typer.echo(f"    get: {get if short else get[:140].rstrip() + '... (--verbose: all of it)'}")
    flagged = sum(r["split_flagged"] for r in rows)
    typer.echo(f"* split not by patient ({flagged} datasets): a patient may have images on both sides of a split")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("present", "missing", "incomplete")}
    typer.echo(f"{len(rows)} datasets: " + ", ".join(f"{n} {s}" for s, n in counts.items())
               + f" (data_root {data_root}, embedded suite {embedded_root})")
