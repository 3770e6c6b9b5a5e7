"""VID and ReviewKD in training: the recipes bind to the quickstart pair (ABF sizes from the models), a wrong
layer is one line listing the valid names, and each recipe runs one epoch on the quickstart and a CIFAR-zoo pair."""

import math

import pytest
from conftest import TINY, compose_config

from distill_runner import runner
from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.errors import ConfigError


def _recipe(overrides):
    cfg = compose_config(TINY + overrides)
    data = build_data(cfg)
    return build_recipe(cfg, data, build_model(cfg.student, "student", data, cfg.seed))


def test_the_recipes_bind_to_the_quickstart_pair_as_the_official_shapes():
    vid = _recipe(["distill=vid"]).terms["vid"]
    assert [r.regressor[0].in_channels for r in vid.regressors] == [16, 32]  # tiny_cnn features.0, features.1
    assert [r.regressor[2].out_channels for r in vid.regressors] == [128, 256]  # middle width: the teacher's
    recipe = _recipe(["distill=reviewkd"])
    review = recipe.terms["reviewkd"]
    assert review.out_sizes == [(8, 8), (4, 4), (1, 1)]  # resnet18 layer2, layer3, avgpool at 16 px
    assert [abf.conv2[0].out_channels for abf in review.abfs] == [512, 256, 128]  # deepest first, as official
    assert review.abfs[0].att_conv is None and review.abfs[0].conv1[0].out_channels == 192  # min(512, 192)
    assert recipe.set_epoch(0, 240)["weight/reviewkd"] == pytest.approx(5.0 / 20)  # warm-up over 20 epochs
    assert recipe.set_epoch(19, 240)["weight/reviewkd"] == pytest.approx(5.0)


@pytest.mark.parametrize("method", ["vid", "reviewkd"])
def test_a_layer_that_does_not_exist_is_one_line_listing_the_valid_ones(method):
    with pytest.raises(ConfigError) as err:
        _recipe([f"distill={method}", f"distill.terms.{method}.pairs=[features.0:layer9]"])
    assert err.value.key == f"distill.terms.{method}.pairs.0.teacher" and "valid names:" in str(err.value)
    assert "\n" not in str(err.value)


def test_vid_refuses_a_pooled_feature_in_one_line():
    with pytest.raises(ConfigError) as err:
        _recipe(["distill=vid", "distill.terms.vid.pairs=[classifier.2:avgpool]"])
    assert err.value.key == "distill.terms.vid.pairs.0" and "4-D feature maps" in str(err.value)


CIFAR_PAIRS = {
    "vid": "[layer1:layer1,layer2:layer2,layer3:layer3]",
    "reviewkd": "[layer1:layer1,layer2:layer2,layer3:layer3,avgpool:avgpool]",
}


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["quickstart", "cifar_zoo"])
@pytest.mark.parametrize("method", ["vid", "reviewkd"])
def test_the_recipe_runs_one_epoch(method, pair, tmp_path):
    zoo = ["teacher=cifar_resnet8", "student=cifar_resnet8", f"distill.terms.{method}.pairs={CIFAR_PAIRS[method]}"]
    models = ["experiment=quickstart"] if pair == "quickstart" else zoo
    cfg = compose_config(models + TINY + [f"distill={method}", "cache.enabled=false", "teacher.epochs=1"])
    history = runner.run(cfg, tmp_path).stages["student"].history
    assert len(history) == 1 and math.isfinite(history[0][f"loss/{method}"]) and history[0][f"loss/{method}"] > 0
