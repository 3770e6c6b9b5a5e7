"""Workers started together on a new PostgreSQL database race to create Optuna's schema: the loser's
"duplicate key value violates unique constraint" is retried, not reported as an unreachable server."""

import pytest
from sqlalchemy.exc import IntegrityError

from distill_runner.search import study

pytest.importorskip("optuna", minversion="4")


def test_a_schema_creation_race_is_retried(monkeypatch):
    calls = []

    def racing(url, heartbeat):
        calls.append(url)
        if len(calls) == 1:
            raise IntegrityError(
                "CREATE TABLE studies", {}, Exception("duplicate key value violates unique constraint")
            )
        return "storage"

    monkeypatch.setattr(study, "rdb_storage", racing)
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    assert study.rdb_storage_once_created("postgresql://db/x", heartbeat=True) == "storage"
    assert len(calls) == 2


def test_a_race_that_never_settles_still_fails(monkeypatch):
    def always(url, heartbeat):
        raise IntegrityError("CREATE TABLE studies", {}, Exception("duplicate key"))

    monkeypatch.setattr(study, "rdb_storage", always)
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    with pytest.raises(IntegrityError):
        study.rdb_storage_once_created("postgresql://db/x", heartbeat=True, tries=3)
