"""teacher.label_smoothing: the teacher's fine-tune cross-entropy with label smoothing (unset or 0: plain CE,
and the teacher's cache key is the one it had before the key existed)."""

import pytest
from conftest import compose_config

from distill_runner.config import validate
from distill_runner.distill.recipe import Recipe
from distill_runner.errors import ConfigError
from distill_runner.io import cache


def key(overrides):
    return cache.teacher_key(compose_config(overrides), "teacher", "files")


def test_label_smoothing_is_a_teacher_input_only_when_set():
    validate(compose_config(["++teacher.label_smoothing=0.2"]))  # a key something reads
    unset = key(["~teacher.label_smoothing"])  # the quickstart sets it
    assert key(["++teacher.label_smoothing=0"]) == unset
    assert key(["++teacher.label_smoothing=0.1"]) != unset
    b0 = cache.baseline_key(compose_config(["~teacher.label_smoothing"]), "files")
    assert cache.baseline_key(compose_config(["++teacher.label_smoothing=0.1"]), "files") == b0


def test_recipe_carries_it_to_the_cross_entropy_term():
    assert Recipe.cross_entropy(0.1).terms["ce"].label_smoothing == 0.1
    assert Recipe.cross_entropy().terms["ce"].label_smoothing == 0.0


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc"])
def test_a_bad_value_is_one_line_naming_the_key_before_anything_runs(value):
    with pytest.raises(ConfigError, match=r"teacher\.label_smoothing.*\[0, 1\)"):
        validate(compose_config([f"teacher.label_smoothing={value}"]))
