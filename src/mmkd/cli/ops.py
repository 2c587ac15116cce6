"""`mmkd deploy`, `mmkd worker`, `mmkd inbox`: the Prefect deployments, a worker, data arrival."""

from __future__ import annotations

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

PREFECT_API_DEFAULT = "http://127.0.0.1:4200/api"


def _prefect_api() -> str:
    """PREFECT_API_URL, else the local server `make prefect-server` starts; fails clearly when none answers."""
    import os
    import urllib.request

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_DEFAULT
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5):
            return url
    except OSError as exc:
        typer.echo(f"no Prefect server answers at {url} ({exc}); start one with `make prefect-server` "
                   f"(prefect server start --host 127.0.0.1) or set PREFECT_API_URL", err=True)
        raise typer.Exit(2)


def _prefect(args: list[str], api: str, home: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_API_URL": api, "MMKD_HOME": str(home)}
    cmd = [str(Path(sys.executable).parent / "prefect"), *args]
    typer.echo("$ prefect " + " ".join(args))
    code = subprocess.run(cmd, cwd=home, env=env).returncode
    if code:
        raise typer.Exit(code)


def _one_run_at_a_time(api: str, pool: str, queue: str) -> None:
    """The work queue the three deployments share, with concurrency limit 1: one flow run per workspace at a time."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mmkd.deployment import WORK_QUEUE_LIMIT

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        try:
            wq = client.read_work_queue_by_name(queue, work_pool_name=pool)
            client.update_work_queue(wq.id, concurrency_limit=WORK_QUEUE_LIMIT)
        except ObjectNotFound:
            client.create_work_queue(queue, work_pool_name=pool, concurrency_limit=WORK_QUEUE_LIMIT)
    typer.echo(f"work queue {pool}/{queue}: concurrency limit {WORK_QUEUE_LIMIT}")


@app.command("deploy")
def deploy(root: Path = RootOpt, params: Optional[Path] = ParamsOpt,
           check: bool = typer.Option(False, "--check", help="exit 1 if prefect.yaml differs from params.yaml"),
           apply: bool = typer.Option(False, "--apply", help="also create the work pool and register the deployments "
                                                             "on the Prefect server (PREFECT_API_URL)")):
    """Write prefect.yaml (retrain on its cron, evaluate on demand, inbox on its cron) from params.yaml's `schedule`."""
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
    pool = ctx.params.schedule.work_pool
    typer.echo(f"wrote {target}")
    if not apply:
        typer.echo("then, with a Prefect server running (make prefect-server): mmkd deploy --apply; mmkd worker")
        return
    import os
    import subprocess
    import sys

    api = _prefect_api()
    exists = subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool", "inspect", pool],
                            env={**os.environ, "PREFECT_API_URL": api}, capture_output=True).returncode == 0
    if not exists:
        _prefect(["work-pool", "create", pool, "--type", "process"], api, ctx.ws.root)
    _one_run_at_a_time(api, pool, ctx.params.schedule.work_queue)
    _prefect(["--no-prompt", "deploy", "--all", "--prefect-file", str(target)], api, ctx.ws.root)
    typer.echo(f"deployments registered on {api}; start a worker: mmkd worker")


@app.command("worker")
def worker(root: Path = RootOpt, params: Optional[Path] = ParamsOpt,
           run_once: bool = typer.Option(False, "--run-once", help="run the scheduled work due now, then exit")):
    """Start a Prefect worker on the work pool, running the deployed flows in this workspace (MMKD_HOME)."""
    ctx = _context(root, params, None)
    api = _prefect_api()
    _prefect(["worker", "start", "--pool", ctx.params.schedule.work_pool, "--type", "process",
              *(["--run-once"] if run_once else [])], api, ctx.ws.root)


@app.command("inbox")
def inbox_cmd(profile: Optional[str] = ProfileOpt, root: Path = RootOpt, params: Optional[Path] = ParamsOpt,
              retrain: bool = typer.Option(True, "--retrain/--no-retrain", help="retrain after ingesting new drops")):
    """Ingest the drops waiting in the inbox (data/ and data.dvc), then retrain and gate: the inbox flow, once."""
    _setup_logging()
    ctx = _context(root, params, profile)
    from flows.inbox import inbox

    with exit_when_busy("mmkd inbox"):
        result = inbox(profile=ctx.params.profile, root=str(ctx.ws.root), params_path=str(ctx.params_path),
                       retrain_after=retrain)
    for d in result["drops"]:
        typer.echo(f"drop {d['name']}: {d['rows']} rows -> {d['drop_id']}"
                   + (" (already ingested)" if d["already_ingested"] else ""))
    for name, why in result["refused"].items():
        typer.echo(f"drop {name}: refused: {why}", err=True)
    if not result["drops"] and not result["refused"]:
        typer.echo(f"inbox {ctx.ws.root / ctx.params.inbox.dir}: no new drop")
    if result.get("retrained"):
        reg = result["retrain"]["registration"]
        typer.echo(f"data version {result['data_version']}: {reg['model_name']} v{reg['version']} "
                   f"{'promoted' if reg['promoted'] else 'held'} ({reg['reason']})")
    if result["refused"]:
        raise typer.Exit(1)
