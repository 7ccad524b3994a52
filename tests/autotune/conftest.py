"""Fixtures of the tuning-database tests: a registered toy template and throwaway databases."""

from __future__ import annotations

import os
import uuid

import pytest

from codegen import template as template_mod
from codegen.space import SearchSpace
from codegen.template import KernelTemplate
from codegen.work import stream_work

TOY = "kdsl_test_tile"


def toy_space() -> SearchSpace:
    return SearchSpace(
        template=TOY,
        params={"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (16, 32, 64), "num_warps": (1, 2, 4)},
        default={"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4},
    )


def _toy_work(problem, config, device):
    return stream_work(problem.get("M", 1), config.get("BLOCK_M", 16), config.get("num_warps", 4), 4.0, device, "f32")


def toy_template(space: SearchSpace, work=None) -> KernelTemplate:
    """A template the database tests can name: records only need its space; nothing launches it."""
    def launch(*args):
        raise AssertionError("the toy template is never launched")

    return KernelTemplate(name=space.template, sources=(), space=space, launch=launch,
                          problem=lambda rendered, env: dict(env), work=work or _toy_work)


def register_toy(monkeypatch, space: SearchSpace, work=None) -> SearchSpace:
    template_mod.templates()  # load the real ones first, so the toy never shadows a lazy import
    monkeypatch.setitem(template_mod._TEMPLATES, space.template, toy_template(space, work))
    return space


@pytest.fixture
def toy(monkeypatch):
    """Registers the toy template for the test (records must name a known template)."""
    return register_toy(monkeypatch, toy_space())


@pytest.fixture
def db_url(tmp_path, monkeypatch):
    """A SQLite file under tmp_path, also set as KDSL_DB so nothing touches the user's cache."""
    url = f"sqlite:///{tmp_path / 'tuning.sqlite'}"
    monkeypatch.setenv("KDSL_DB", url)
    monkeypatch.setenv("KDSL_CACHE_DIR", str(tmp_path / "cache"))
    return url


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the cluster of KDSL_TEST_PG_URL (see .ci/postgres.sh), dropped after."""
    base = os.environ.get("KDSL_TEST_PG_URL")
    if not base:
        pytest.skip("KDSL_TEST_PG_URL is not set (start a cluster with .ci/postgres.sh)")
    import sqlalchemy as sa

    name = f"kdsl_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(base).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()
