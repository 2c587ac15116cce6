"""`mmkd verify`: check every store of the workspace byte by byte; one line per problem, exit 1 if any."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmkd.cli.common import ParamsOpt, RootOpt, app, exit_when_busy


@app.command("verify")
def verify(root: Path = RootOpt, params: Optional[Path] = ParamsOpt,
           repair: bool = typer.Option(False, "--repair", help="drop damaged feature shards, so that the next "
                                                              "cache_features / align recomputes their rows")):
    """Check the curated store and the feature stores (raw and aligned) against their checksums: every byte."""
    from mmkd.config import ConfigError, Workspace, load_params
    from mmkd.integrity import verify_workspace

    try:  # not _context: the steps' imports (torch, MLflow) would cost seconds a check does not need
        ws = Workspace(root, load_params(params or Path(root) / "params.yaml"))
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    from mmkd.workspace_lock import workspace_lock

    # under the workspace lock: opening a feature store may migrate its index, and --repair drops shards, so no
    # step may write meanwhile (and a store being written is not judged half-way)
    with exit_when_busy("mmkd verify"), workspace_lock(ws.root, ws.params.workspace.lock_wait_s, "mmkd verify"):
        report = verify_workspace(ws.curated, {"teachers": ws.teacher_features, "aligned": ws.aligned_features},
                                  repair)
    for line in report.problems:
        typer.echo(f"PROBLEM {line}")
    for line in report.notes:
        typer.echo(f"note: {line}")
    for line in report.checked.values():
        typer.echo(f"checked {line}")
    if report.problems:
        typer.echo(f"verify: {len(report.problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"verify: ok ({len(report.checked)} store(s) checked, no problem)")
