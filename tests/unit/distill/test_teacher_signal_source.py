"""One object decides where the distill stage's teacher signal comes from (issue 27, point 3): built once with the
typed config, the recipe, the data, the teachers and the cache, asked once; no callbacks into the cache or the
runner. Online when asked or when replay would not fit; replayed (computed, then reused from the cache) otherwise."""

import logging

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.config import validate
from distill_runner.distill.signals import OnlineTeacher, ReplayedTeacher, TeacherSignalSource
from distill_runner.io.cache import Cache, teacher_outputs_key
from distill_runner.precision import resolve_precision

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts():
    spec = validate(compose_config(TINY + ["trainer.epochs=2"]))
    data = build_data(spec, CPU)
    student = build_model(spec.student, "student", data, spec.seed)
    teacher = build_model(spec.teacher, "teacher", data, spec.seed).eval()
    return spec, data, build_recipe(spec, data, student, teacher), teacher


def source(parts, cache=None, **distill):
    spec, data, recipe, teacher = parts
    for k, v in distill.items():
        setattr(spec.distill, k, v)
    return TeacherSignalSource(spec, recipe, data, [teacher], ["t"], cache, CPU, resolve_precision("32", CPU))


def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher outputs:")]


def test_online_when_asked_replayed_and_reused_from_the_cache_otherwise(parts, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="distill_runner.distill.signals")
    assert isinstance(source(parts, teacher_outputs="online").signal(), OnlineTeacher)
    assert said(caplog) == ["teacher outputs: online (distill.teacher_outputs=online)"]
    caplog.clear()
    cache = Cache(tmp_path / "cache")
    first = source(parts, cache, teacher_outputs="cached")
    assert isinstance(first.signal(), ReplayedTeacher)
    spec, data = parts[0], parts[1]
    key = teacher_outputs_key(spec, ["t"], data.fingerprint, first.views, parts[2].summary_spec())
    assert first.key() == key and cache.stored_mb("teacher_outputs", key) is not None  # the key the cache holds
    again = source(parts, cache, teacher_outputs="cached").signal()
    assert torch.equal(again.logits, first.signal().logits)
    lines = said(caplog)
    assert "computed and stored in" in lines[0] and "estimated" in lines[0]
    assert "reused from" in lines[1] and "its stored file's size checked against the limit" in lines[1]


def test_too_big_to_replay_runs_online_and_says_why(parts, caplog):
    caplog.set_level(logging.INFO, logger="distill_runner.distill.signals")
    spec = parts[0]
    spec.cache.max_teacher_outputs_mb, before = 0.0, spec.cache.max_teacher_outputs_mb
    try:
        assert isinstance(source(parts, teacher_outputs="cached").signal(), OnlineTeacher)
    finally:
        spec.cache.max_teacher_outputs_mb = before
    assert said(caplog)[0].startswith("teacher outputs: online (they would take ")
    assert "> cache.max_teacher_outputs_mb=0.0; raise it to replay them" in said(caplog)[0]
