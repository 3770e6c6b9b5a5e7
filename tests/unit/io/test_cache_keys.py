"""Cache keys are built from what each key of the schema (distill_runner.spec) declares it affects; every
config key is declared there, with the artefacts it determines or as not changing a cached result."""

from pathlib import Path

import pytest
from conftest import compose_config

from distill_runner.io import cache
from distill_runner.schema import unknown_keys
from distill_runner.spec import RunSpec, reference

CONF = Path(__file__).resolve().parents[3] / "conf"
GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("dataset", "teacher", "student", "distill", "trainer")
}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def every_composed_config():
    yield compose_config()
    for group, options in GROUPS.items():
        for option in options:
            yield compose_config([f"{group}={option}"])
    for experiment in EXPERIMENTS:
        yield compose_config(experiment=experiment)
    for option in sorted(p.stem for p in (CONF / "search").glob("*.yaml")):
        yield compose_search([f"search={option}"])


def compose_search(overrides):
    """distill-search's config (conf/distill_search.yaml: distill-run's plus the search node)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        return compose(config_name="distill_search", overrides=overrides)


@pytest.mark.slow
def test_every_config_key_is_declared_in_the_schema_with_what_it_affects():
    """Every key of every shipped config (each group option, each experiment) is declared in the schema or passed
    through to a factory, and every declared key says what it affects (itself, or the node it lies in)."""
    undeclared = set()
    for cfg in every_composed_config():
        undeclared |= {path for path, _ in unknown_keys(RunSpec, cfg)}
    assert not undeclared, f"config keys not declared in distill_runner/spec.py: {sorted(undeclared)}"
    assert not [k.path for k in reference() if k.affects is None], "declare affects= for each key"


def test_not_results_are_the_keys_declared_to_affect_nothing():
    """The same keys as cache FORMAT 3's hand-kept list (run folders and TensorBoard read it), plus search."""
    assert set(cache.NOT_RESULTS) == {
        "data.decode_cache", "hydra", "cache.enabled", "cache.dir", "cache.shared", "cache.max_teacher_outputs_mb",
        "trainer.device", "trainer.progress", "trainer.resume", "data.on_device", "dataset.num_workers",
        "dataset.pin_memory", "dataset.device", "dataset.store_dir", "dataset.progress", "dataset.download",
        "dataset.name", "teacher.name", "student.name", "eval.speed", "search",
    }  # fmt: skip


# (override, the artefacts whose keys it changes: the same as the hand-kept lists of cache FORMAT 3 gave)
CHANGES = [
    ("seed=1", "teacher baseline outputs"),
    ("dataset.image_size=24", "teacher baseline outputs speed"),
    ("dataset.eval_batch_size=8", "teacher baseline outputs eval speed"),
    ("+dataset.my=1", "teacher baseline outputs"),
    ("teacher.epochs=2", "teacher"),
    ("teacher.label_smoothing=0.2", "teacher"),
    ("teacher.name=q", ""),
    ("trainer.epochs=3", "baseline"),
    ("trainer.precision=bf16-mixed", "teacher baseline outputs"),
    ("trainer.channels_last=true", "teacher baseline speed"),
    ("trainer.progress=false", ""),
    ("eval.test_every_epoch=true", "teacher baseline"),
    ("eval.latency_threads=2", "speed"),
    ("eval.cka_samples=10", "eval"),
    ("eval.speed=measure", ""),
    ("cache.teacher_outputs_dtype=float32", "outputs"),
    ("distill.temperature=8", ""),
    ("export=onnx", ""),
    ("student.name=z", ""),
]


def every_key(cfg) -> dict:
    import torch

    cpu = torch.device("cpu")
    return {
        "teacher": cache.teacher_key(cfg, "teacher", "files"),
        "baseline": cache.baseline_key(cfg, "files"),
        "outputs": cache.teacher_outputs_key(cfg, ["t"], "files", 2),
        "eval": cache.eval_key(cfg, "model", "teacher", [], cpu),
        "speed": cache.speed_key(cfg, {"student": "repr"}, cpu, "32", {}),
    }


@pytest.mark.slow
@pytest.mark.parametrize("override,changed", CHANGES, ids=[c[0] for c in CHANGES])
def test_each_key_changes_exactly_the_artefacts_it_is_declared_to_affect(override, changed):
    before, after = every_key(compose_config()), every_key(compose_config([override]))
    assert {a for a in before if before[a] != after[a]} == set(changed.split())


def test_an_extra_teacher_is_keyed_by_its_own_node():
    base = compose_config(["distill=multi_teacher"])
    changed = compose_config(["distill=multi_teacher", "distill.teachers.cnn.epochs=2"])
    key = lambda cfg, node: cache.teacher_key(cfg, node, "files")
    assert key(base, "teacher") == key(changed, "teacher") and key(base, "distill.teachers.cnn") != key(
        changed, "distill.teachers.cnn")  # fmt: skip


def keys(overrides, dataset="digits"):
    cfg = compose_config([f"dataset={dataset}", *overrides])
    return cache.teacher_key(cfg, "teacher", "files"), cache.baseline_key(cfg, "files")


@pytest.mark.parametrize("dataset", ["digits", "chest_xray"])
def test_progress_resume_workers_memory_and_placement_retrain_nothing(dataset):
    plumbing = ["trainer.progress=false", "trainer.resume=auto", "data.on_device=true", "trainer.device=cpu",
                "cache.max_teacher_outputs_mb=1", "distill.temperature=8", "export=onnx"]  # fmt: skip
    if dataset == "chest_xray":
        plumbing += ["dataset.num_workers=0", "dataset.pin_memory=false", "dataset.store_dir=elsewhere"]
    assert keys(plumbing, dataset) == keys([], dataset)


@pytest.mark.parametrize("override", ["seed=1", "dataset.image_size=24", "trainer.precision=bf16-mixed"])
def test_what_determines_both_changes_both(override):
    (t0, b0), (t1, b1) = keys([]), keys([override])
    assert t0 != t1 and b0 != b1


def test_each_artefact_follows_only_its_own_inputs():
    (t0, b0), (t1, b1) = keys([]), keys(["teacher.epochs=2"])
    assert t0 != t1 and b0 == b1
    (t0, b0), (t1, b1) = keys([]), keys(["trainer.epochs=3", "student=mobilenet_v2"])
    assert t0 == t1 and b0 != b1


def test_a_key_of_the_users_own_data_set_factory_enters_the_data_key():
    (t0, b0), (t1, b1) = keys(["+dataset.my_crop=4"]), keys(["+dataset.my_crop=8"])
    assert t0 != t1 and b0 != b1


def summaries(overrides):
    """The recipe's teacher summaries (what replay stores besides logits), built as the runner builds them."""
    from distill_runner.build import build_data, build_model, build_recipe

    cfg = compose_config(["dataset.image_size=16", "dataset.limit=16", *overrides])
    data = build_data(cfg)
    return build_recipe(cfg, data, build_model(cfg.student, "student", data, cfg.seed)).summary_spec()


@pytest.mark.slow
def test_replayed_outputs_follow_what_is_stored_besides_logits():
    """The recipe is not a cache input (RUN_ONLY), but what its feature terms store is: the layers and how
    each term reduces them. A logit recipe stores none, and keeps the key it had before features were replayed."""
    cfg = compose_config()
    key = lambda stored=None: cache.teacher_outputs_key(cfg, ["teacher"], "files", 10, stored)
    feature, attention = summaries(["distill=feature"]), summaries(["distill=attention"])
    assert summaries(["distill=kd"]) == {} and key({}) == key()
    assert len({key(), key(feature), key(attention), key(summaries(["distill=combo"]))}) == 4
    assert feature == {"feature": {"layers": ["layer2", "layer3"], "summary": "identity"}}
    # the KD settings and the terms' weights are not stored: a sweep over them shares one entry
    swept = ["distill.alpha=0.9", "distill.temperature=8", "distill.terms.feature.weight=3"]
    assert summaries(["distill=feature", *swept]) == feature
    assert summaries(["distill=attention", "distill.terms.attention.weight=10"]) == attention
    # what the stored values depend on is: the layers, and a reduction's own arguments
    assert summaries(["distill=feature", "distill.terms.feature.pairs=[features.1:layer3]"]) != feature
    assert summaries(["distill=attention", "distill.terms.attention.p=4"]) != attention
