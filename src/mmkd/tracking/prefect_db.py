"""Owns the pre-migrated Prefect database: built once at install, copied into a fresh PREFECT_HOME so that the
first flow's temporary server does not run Prefect's ~100 schema migrations (4-5 s) before it answers."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path


def template_path() -> Path:
    """Inside the environment Prefect is installed in: `make install` rebuilds it whenever it reinstalls."""
    return Path(sys.prefix) / "share" / "mmkd" / "prefect.db"


def _copy(src: Path, dst: Path) -> None:
    """A consistent single-file copy (SQLite's backup API: no -wal or -shm file is needed beside it)."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def build_template(dst: Path | None = None) -> Path:
    """Run Prefect's own migrations (`prefect server database upgrade`) on an empty database in a scratch
    PREFECT_HOME, then publish it whole (temp + rename)."""
    dst = Path(dst or template_path())
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmkd-prefect-db-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        _copy(Path(home) / "prefect.db", tmp)
        os.replace(tmp, dst)
    return dst


def seed_home(template: Path | None = None) -> Path | None:
    """Copy the template to PREFECT_HOME/prefect.db when Prefect will use that file and it does not exist yet;
    the copy appears only whole and never replaces a database (link, not rename: of two runs seeding one home
    at once, the second finds the first's file and leaves it). Prefect still runs its migrations on start: an
    older template (Prefect upgraded since install) is brought to the current schema, from where it stands.
    Returns the seeded database, None when nothing was done."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME

    template = Path(template or template_path())
    home = Path(PREFECT_HOME.value()).expanduser()
    db = home / "prefect.db"
    if PREFECT_API_DATABASE_CONNECTION_URL.value() != f"sqlite+aiosqlite:///{db}" or db.exists() \
            or not template.is_file():
        return None
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".prefect.db.{os.getpid()}.tmp"
    try:
        _copy(template, tmp)
        os.link(tmp, db)
    except (FileExistsError, sqlite3.Error, OSError):
        return None  # another run seeded it, or the template is unreadable: Prefect creates the schema itself
    finally:
        tmp.unlink(missing_ok=True)
    return db


if __name__ == "__main__":
    print(build_template(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
