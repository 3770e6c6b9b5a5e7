"""The typed schema: every key declared once (type, check, help, affects), validated once into a RunSpec that
hands the runner what validation built; a reference of every key for the docs."""

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from distill_runner import runner
from distill_runner.config import validate
from distill_runner.distill import signals
from distill_runner.errors import ConfigError
from distill_runner.io.run_folder import release
from distill_runner.schema import Affects, unknown_keys
from distill_runner.spec import RunSpec, TeacherSpec, reference


def test_the_reference_lists_every_key_with_type_default_check_help_and_affects():
    keys = {k.path: k for k in reference()}
    lr = keys["trainer.optimizer.lr"]
    assert (lr.type, lr.default, lr.check, lr.affects) == ("float | None", None, "number > 0", Affects.BASELINE)
    assert keys["seed"].default == "(required)" and keys["seed"].check == "int in [0, 4.29497e+09)"
    assert keys["distill.teachers.<name>.epochs"].affects == Affects.TEACHER
    assert keys["teacher.checkpoint"].file and keys["eval.latency_threads"].affects == Affects.SPEED
    assert all(k.help for k in keys.values()), [p for p, k in keys.items() if not k.help]


def test_a_key_no_declaration_covers_is_found_in_any_node():
    cfg = compose_config()
    OmegaConf.set_struct(cfg, False)
    cfg.trainer.epoch = 3
    cfg.eval.latency = 1
    cfg.dataset.my_factory_key = 2  # a data set factory's own key passes through to it
    cfg.teacher.model.depth = 18  # so does a model factory's
    assert sorted(path for path, _ in unknown_keys(RunSpec, cfg)) == ["eval.latency", "trainer.epoch"]


def test_validation_gives_the_typed_config_and_what_it_built():
    spec = validate(compose_config(["distill=multi_teacher", "distill.teacher_weights={teacher:2.0,cnn:1.0}"]))
    assert isinstance(spec.distill.teachers["cnn"], TeacherSpec) and spec.distill.teachers["cnn"].epochs == 4
    assert spec.trainer.epochs == 10 and spec.dataset.batch_size == 64 and spec.trainer.channels_last is False
    assert spec.distill.weights == [2.0, 1.0] and type(spec.recipe).__name__ == "Recipe"
    assert validate(spec) is spec


def test_the_recipe_and_the_teachers_are_built_and_parsed_once(tmp_path, monkeypatch, fast):
    calls = {"extra_teachers": 0, "teacher_weights": 0}
    for name in calls:
        real = getattr(signals, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(signals, name, counted)
    spec = validate(compose_config([*fast, "distill=multi_teacher", "distill.teachers.cnn.epochs=1"]))
    ctx = runner.prepare(spec, tmp_path / "run", [])
    try:
        built = runner.build(ctx)
    finally:
        release(ctx.run_dir)
    assert built.recipe is spec.recipe and list(built.teachers) == ["teacher", "distill.teachers.cnn"]
    assert calls == {"extra_teachers": 1, "teacher_weights": 1}


SEARCH_BAD = [
    ("search.trials=0", "search.trials", "use an integer >= 1"),
    ("search.objective=accuracy", "search.objective", "use one of latency_ms, macs, params or null"),
    ("+search.budget.flops=1", "search.budget.flops", "budgets are latency_ms, macs, params"),
    ("search.budget.params=-1", "search.budget.params", "use null or a number > 0"),
    ("search.role=boss", "search.role", "use main (the whole search) or worker (trials only)"),
    ("search.repair_journal=1", "search.repair_journal", "use true or false"),
]


@pytest.mark.parametrize("override,key,fix", SEARCH_BAD, ids=[b[0] for b in SEARCH_BAD])
def test_the_search_node_is_checked_by_the_same_schema(override, key, fix):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        cfg = compose(config_name="distill_search", overrides=[override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)  # the search node and its space are part of the one validation
    assert err.value.key == key and err.value.fix == fix and "\n" not in str(err.value)
