"""Owns the `mmkd` command line: one module per concern, all registered on one Typer app (in `--help` order)."""

from mmkd.cli.common import app
from mmkd.cli import pipeline  # noqa: E402,F401,I001  (each module registers its commands on import)
from mmkd.cli import ops  # noqa: E402,F401
from mmkd.cli import integrity  # noqa: E402,F401
from mmkd.cli import inference  # noqa: E402,F401
from mmkd.cli import services  # noqa: E402,F401
from mmkd.cli import data  # noqa: E402,F401

__all__ = ["app"]
