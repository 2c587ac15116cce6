"""The pre-migrated Prefect database: built at install, seeded only into a fresh PREFECT_HOME, never over a database."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME, temporary_settings

from mmkd.tracking.prefect_db import seed_home, template_path


def _template(path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE alembic_version (version_num TEXT)")
    con.execute("INSERT INTO alembic_version VALUES ('from-template')")
    con.commit()
    con.close()


def _home(home) -> dict:
    """PREFECT_HOME with Prefect's default database in it (the test session's harness points the URL elsewhere)."""
    return {PREFECT_HOME: str(home), PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{home}/prefect.db"}


def _version(db) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    finally:
        con.close()


def test_fresh_home_is_seeded_and_an_existing_database_is_left_alone(tmp_path):
    template = tmp_path / "template.db"
    _template(template)
    home = tmp_path / "home"
    with temporary_settings(_home(home)):
        assert seed_home(template) == home / "prefect.db"
        assert _version(home / "prefect.db") == "from-template"
        assert list(home.glob(".prefect.db.*")) == []  # no temporary copy left behind
        con = sqlite3.connect(home / "prefect.db")
        con.execute("UPDATE alembic_version SET version_num = 'the user''s'")
        con.commit()
        con.close()
        assert seed_home(template) is None  # a database exists: never replaced
        assert _version(home / "prefect.db") == "the user's"


def test_nothing_is_seeded_without_a_template_or_for_another_database(tmp_path):
    template = tmp_path / "template.db"
    with temporary_settings(_home(tmp_path / "a")):
        assert seed_home(template) is None and not (tmp_path / "a" / "prefect.db").exists()
    _template(template)
    with temporary_settings({PREFECT_HOME: str(tmp_path / "b"),
                             PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{tmp_path}/elsewhere.db"}):
        assert seed_home(template) is None
    assert not (tmp_path / "b" / "prefect.db").exists() and not (tmp_path / "elsewhere.db").exists()


def _seed_in_child(home: str, template: str, start, out) -> None:
    with temporary_settings(_home(home)):
        start.wait()
        out.put(str(seed_home(template)))


def test_two_runs_seeding_one_home_at_once_leave_one_database(tmp_path):
    template = tmp_path / "template.db"
    _template(template)
    home = tmp_path / "home"
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_seed_in_child, args=(str(home), str(template), start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = sorted(out.get(timeout=5) for _ in procs)
    assert str(home / "prefect.db") in results  # at least one seeded; a second finds it and leaves it
    assert _version(home / "prefect.db") == "from-template"
    assert [p.name for p in home.iterdir()] == ["prefect.db"]


def test_the_installed_template_is_at_prefects_schema_head():
    """`make install` builds it: a missing or stale one is an install defect (the flow still works, slower)."""
    path = template_path()
    assert path.is_file(), f"{path} missing: run `make install` (it runs python -m mmkd.tracking.prefect_db)"
    from pathlib import Path

    import prefect.server.database
    from alembic.script import ScriptDirectory

    migrations = Path(prefect.server.database.__file__).parent / "_migrations"
    scripts = ScriptDirectory(str(migrations), version_locations=[str(migrations / "versions" / "sqlite")])
    assert _version(path) == scripts.get_current_head()


def test_seed_refuses_an_unreadable_template(tmp_path):
    template = tmp_path / "template.db"
    template.write_bytes(b"not a database at all" * 100)
    with temporary_settings(_home(tmp_path / "h")):
        assert seed_home(template) is None
    assert not (tmp_path / "h" / "prefect.db").exists()
