"""Owns what every `mmkd` command shares: the Typer apps, the common options, logging and loading the context."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

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


@contextmanager
def exit_when_busy(command: str) -> Iterator[None]:
    """Another run holds the workspace (mmkd.workspace_lock): say who, and exit 75 (EX_TEMPFAIL: nothing was done,
    try again later) rather than print a traceback."""
    from mmkd.workspace_lock import WorkspaceBusy

    try:
        yield
    except WorkspaceBusy as exc:
        typer.echo(f"{command}: {exc}", err=True)
        raise typer.Exit(75)
