"""`mmkd stage`, `mmkd evaluate`, `mmkd run`: one step (DVC's entry point), the evaluation, the whole flow."""

from __future__ import annotations

import json
import threading
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
    app,
)


def start_prefect_server_early() -> threading.Thread | None:
    """Without a Prefect server to talk to (no PREFECT_API_URL), Prefect starts a temporary one (a subprocess, 3-5 s
    until healthy) at the flow's first API call, after the imports; started here in a thread, the two overlap. A
    fresh PREFECT_HOME gets the database `make install` migrated (mmkd.tracking.prefect_db), not an empty one. The
    caller joins the thread before the flow runs, so the flow never sees a server still starting."""
    import flows  # noqa: F401 - its offline defaults (startup timeout, telemetry off) must reach the server
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        from mmkd.tracking.prefect_db import seed_home

        seed_home()  # a fresh PREFECT_HOME starts from the schema built at install (no migrations to run)
        try:
            SubprocessASGIServer().start()  # the instance Prefect's client uses (one per port; None: any free port)
        except Exception:  # noqa: BLE001 - the flow's own start will try again and say what is wrong
            pass

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return thread


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
    with exit_when_busy(f"mmkd stage {name}"):
        if name == "cache_features" and ctx.params.features.executor == "dask":
            from tasks.cache_features import (
                cache_features,  # units on a Dask cluster through Prefect's task runner
            )

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
        with exit_when_busy("mmkd evaluate"):
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
def run(profile: Optional[str] = ProfileOpt, root: Path = RootOpt, params: Optional[Path] = ParamsOpt,
        force: bool = typer.Option(False, "--force", help="run every step, even those unchanged since their last "
                                                          "success (schedule.skip_unchanged skips them)")):
    """Run the whole `retrain` Prefect flow: curate -> ... -> register (steps unchanged since their last success
    are skipped)."""
    _setup_logging()
    server = start_prefect_server_early()
    ctx = _context(root, params, profile)  # fail fast on bad params
    from flows.retrain import (
        retrain,  # flows/ and tasks/ are installed beside mmkd (pyproject.toml)
    )

    if server is not None:
        server.join()

    with exit_when_busy("mmkd run"):
        result = retrain(profile=ctx.params.profile, root=str(ctx.ws.root), params_path=str(ctx.params_path),
                         force=force)
    ws = ctx.ws
    typer.echo("\n" + ws.leaderboard.read_text())
    typer.echo(f"metrics:      {ws.metrics}\nleaderboard:  {ws.leaderboard}\nData Docs:    {ws.reports / 'data_docs' / 'index.html'}")
    reg = result["registration"]
    typer.echo(f"model:        {reg['model_uri']} (tracking {reg['tracking_uri']})")
    typer.echo(f"gate:         {'promoted to' if reg['promoted'] else 'not promoted to'} {reg['champion_alias']}: "
               f"{reg['reason']}; {reg['champion_uri']} is v{reg['champion_version']}")
    typer.echo("MLflow UI:    bash mlflow_server/start.sh   then open http://127.0.0.1:5000")
    if result["skipped"]:
        typer.echo(f"skipped:      {', '.join(result['skipped'])} (unchanged since their last success; --force runs them)")
    typer.echo(f"wall time:    {result['seconds']:.0f} s")
