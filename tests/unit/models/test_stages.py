"""Stage outputs and pre-ReLU taps (distill_runner.models.stages): the taps hold the values the official codes'
``preact`` features hold, a wrong name is one line listing the valid ones, the layer table is current."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill_runner.errors import ConfigError
from distill_runner.models.cifar.resnet import cifar_resnet
from distill_runner.models.cifar.shufflenet import shufflenet_v2
from distill_runner.models.cifar.wrn import wide_resnet
from distill_runner.models.factories import tiny_cnn, torchvision_model
from distill_runner.models.features import FeatureTap, check_layer
from distill_runner.models.stages import pre_relu, stage_layers, stage_named, stages

ROOT = Path(__file__).resolve().parents[3]


def _taps(model, size=16):
    found = stages(model)
    tap = FeatureTap(model, [s.output for s in found] + [s.pre_relu for s in found])
    model.eval()
    with torch.no_grad():
        out = tap(torch.randn(2, 3, size, size))["features"]
    tap.remove()
    return found, out


@pytest.mark.parametrize(
    "build", [lambda: cifar_resnet(10, 8, [16, 16, 32, 64]), lambda: torchvision_model("resnet18", 10, image_size=16)]
)
def test_a_resnet_stage_output_is_the_relu_of_its_pre_relu_tap_even_with_an_in_place_relu_called_twice(build):
    torch.manual_seed(0)
    found, out = _taps(build())
    assert [s.output for s in found][:3] == ["layer1", "layer2", "layer3"]
    for s in found:
        assert (out[s.pre_relu] < 0).any()  # not overwritten by the in-place ReLU
        torch.testing.assert_close(F.relu(out[s.pre_relu]), out[s.output])


def test_tiny_cnn_and_wrn_pre_relu_taps_are_their_batchnorms_outputs():
    torch.manual_seed(0)
    found, out = _taps(tiny_cnn(10))
    assert [s.output for s in found] == ["features.0", "features.1"]
    torch.testing.assert_close(F.max_pool2d(F.relu(out["features.0.2:input"]), 2), out["features.0"])
    model = wide_resnet(10, 16, 1)
    found, out = _taps(model)
    torch.testing.assert_close(out[found[0].pre_relu], model.block2.layer[0].bn1(out["block1"]))
    torch.testing.assert_close(out[found[2].pre_relu], model.bn1(out["block3"]))


def test_a_wrong_stage_name_is_one_line_listing_the_stages():
    model = cifar_resnet(10, 8, [16, 16, 32, 64])
    with pytest.raises(ConfigError) as err:
        stage_named(model, "layer9", "terms.ofd.pairs.0.teacher", "teacher")
    assert "\n" not in str(err.value) and "stages: layer1, layer2, layer3" in str(err.value)
    with pytest.raises(ConfigError, match="input"):
        check_layer(model, "layer9.relu:input", "terms.x", "teacher")
    check_layer(model, "layer3.0.relu_out:input", "terms.x", "teacher")
    assert stage_layers(model) == ["layer1", "layer2", "layer3"]


def test_a_stage_without_pre_relu_or_batchnorm_is_refused_in_one_line():
    model = shufflenet_v2(10)
    with pytest.raises(ConfigError, match="no pre-ReLU output") as err:
        pre_relu(model, stages(model)[0], "terms.ofd.pairs.0.student", "student")
    assert "\n" not in str(err.value)
    model = tiny_cnn(10)
    assert pre_relu(model, stages(model)[1], "k", "teacher", need_bn=True).bn == "features.1.1"


@pytest.mark.slow
def test_the_layer_table_is_current():
    done = subprocess.run(
        [sys.executable, "scripts/layer_table.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
