"""Cache keys are built from explicit lists of what determines each artefact; every config key is
either one of those inputs or declared as not changing a cached result."""

from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import DictConfig

from distill_runner import cache

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("dataset", "teacher", "student", "distill")
}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def every_composed_config():
    yield compose_config()
    for group, options in GROUPS.items():
        for option in options:
            yield compose_config([f"{group}={option}"])
    for experiment in EXPERIMENTS:
        yield compose_config(experiment=experiment)


def leaf_keys(node, prefix=""):
    """Dotted paths of every value that is not itself a mapping (lists are values)."""
    for key, value in node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items():
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig) and len(value):
            yield from leaf_keys(value, path + ".")
        else:
            yield path


def test_every_config_key_is_a_cache_input_or_declared_not_to_change_a_result():
    unclassified = set()
    for cfg in every_composed_config():
        declared = cache.declared_keys(cfg)
        unclassified |= {k for k in leaf_keys(cfg) if not cache.covered(k, declared)}
    assert not unclassified, (
        f"config keys in no cache key and not declared in cache.RUN_ONLY / cache.NOT_RESULTS: {sorted(unclassified)}; "
        "add each to the inputs of the artefacts it determines, or declare it"
    )


def test_declared_keys_do_not_overlap():
    inputs = {*cache.DATA_INPUTS, *cache.BASELINE_INPUTS, *cache.TEACHER_OUTPUTS_INPUTS, *cache.EVAL_INPUTS}
    assert not inputs & set(cache.NOT_RESULTS) and not inputs & set(cache.RUN_ONLY)


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
