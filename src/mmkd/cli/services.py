"""`mmkd dashboard`, `mmkd mlflow-server`: the web dashboard and the MLflow servers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmkd.cli.common import ParamsOpt, RootOpt, app
from mmkd.config import ConfigError


@app.command("dashboard")
def dashboard(tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else params' tracking.tracking_uri, else mlflow_server/mlflow.db)"),
              port: int = typer.Option(8501, "--port", help="port to serve on"),
              host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
              mlflow_ui_url: Optional[str] = typer.Option(None, "--mlflow-ui-url", help="the MLflow UI's base URL for links (default: the tracking server's URL)"),
              screenshots: Optional[Path] = typer.Option(None, "--screenshots", help="write PNGs of the dashboard and the MLflow model pages into this folder (headless Chromium), then exit"),
              root: Path = RootOpt, params: Optional[Path] = ParamsOpt):
    """The dashboard (Streamlit) on MLflow: champion vs teachers, its gap to the best teacher, the champions' history."""
    import os
    import sys

    from mmkd.config import load_params
    from mmkd.tracking.mlflow_runs import tracking_uri as resolve_uri

    params_path = params or root / "params.yaml"
    try:
        p = load_params(params_path) if params or params_path.exists() else None  # optional here
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    uri = tracking_uri or resolve_uri(root, p.tracking.tracking_uri if p else None)
    model, alias = (p.register_.model_name, p.register_.champion_alias) if p else ("mmkd-student", "champion")
    if screenshots is not None:
        from dashboards.screenshots import (
            capture,  # dashboards/ is installed beside mmkd (pyproject.toml)
        )

        for path in capture(uri, screenshots, mlflow_ui_url, model, alias):
            typer.echo(path)
        return
    from dashboards import streamlit_command

    cmd = streamlit_command(uri, port, host, mlflow_ui_url, model, alias, python=sys.executable)
    typer.echo(f"dashboard: http://{host}:{port}  (MLflow: {uri}; Ctrl-C stops it)")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # streamlit replaces this process: signals reach it, no orphan when it is stopped


@app.command("mlflow-server")
def mlflow_server(team: bool = typer.Option(False, "--team", help="a complete local team stack: PostgreSQL (pgserver) "
                                            "backend, SeaweedFS S3 artifact store (also DVC's remote), MLflow"),
                  auth: bool = typer.Option(False, "--auth", help="MLflow's basic-auth app: every request needs a user "
                                            "and password (the admin's is generated once and printed)"),
                  root: Path = RootOpt,
                  store: Optional[Path] = typer.Option(None, "--dir", help="where the stores live (default: "
                                                       "ROOT/mlflow_server; with --team ROOT/mlflow_server/team)"),
                  host: str = typer.Option("127.0.0.1", "--host", help="address MLflow (and S3) bind"),
                  port: int = typer.Option(5000, "--port"),
                  s3_port: int = typer.Option(8333, "--s3-port", help="with --team: the S3 gateway's port"),
                  workers: int = typer.Option(2, "--workers", help="MLflow server worker processes")):
    """Start an MLflow tracking server, print what clients need, stay up until Ctrl-C (mlflow_server/README.md)."""
    from mmkd.tracking import servers

    base = (root / "mlflow_server").resolve()
    if team:
        stack = servers.team_stack(store or base / "team", auth, host, port, s3_port, workers=workers)
    else:
        stack = servers.local_server(store or base, auth, host, port, workers)
    raise typer.Exit(servers.serve_forever(stack, typer.echo))
