"""Every relation recipe (RKD, PKT, SP, CC, NST, FSP, KDSVD, ICKD) runs one epoch end to end on digits with the
quickstart pair (resnet18 -> tiny CNN) and with a CIFAR-zoo pair (resnet20 -> resnet8, layer names as overrides);
a layer that does not exist, or an FSP/KDSVD pair of unequal widths, is one line before any training."""

import math

import pytest
from conftest import compose_config
from one_epoch import ZOO, one_epoch, teacher_fixture

from distill_runner import runner
from distill_runner.errors import ConfigError

EQUAL_WIDTHS = ["student.model.channels=[64,128]"]  # FSP, KDSVD: resnet18's layer1/layer2 widths
QUICKSTART = {name: EQUAL_WIDTHS if name in ("fsp", "kdsvd") else [] for name in
              ["rkd", "pkt", "sp", "cc", "nst", "fsp", "kdsvd", "ickd"]}  # fmt: skip
STAGES = '["layer1:layer1","layer2:layer2","layer3:layer3"]'
ZOO_LAYERS = {  # resnet20 -> resnet8 (16, 16, 32, 64 channels both): RepDistiller's feat[...] for each method
    "rkd": ["distill.terms.rkd.student=avgpool"],
    "pkt": ["distill.terms.pkt.student=avgpool"],
    "cc": ["distill.terms.cc.student=avgpool"],
    "sp": ["distill.terms.sp.student=layer3", "distill.terms.sp.teacher=layer3"],
    "nst": [f"distill.terms.nst.pairs={STAGES}"],
    "fsp": ['distill.terms.fsp.pairs=["relu:relu","layer1:layer1","layer2:layer2","layer3:layer3"]'],
    "kdsvd": [f"distill.terms.kdsvd.pairs={STAGES}"],
    "ickd": ['distill.terms.ickd.pairs=["layer3:layer3"]'],
}
quickstart = teacher_fixture([])
zoo = teacher_fixture(ZOO)


def _one_epoch(overrides, name, tmp_path):
    _, record = one_epoch(compose_config(overrides + [f"distill={name}"]), tmp_path)
    assert math.isfinite(record["loss/total"]) and math.isfinite(record[f"loss/{name}"]), record


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICKSTART)
def test_one_epoch_with_the_quickstart_pair(name, quickstart, tmp_path):
    _one_epoch(quickstart + QUICKSTART[name], name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_LAYERS)
def test_one_epoch_with_a_cifar_zoo_pair(name, zoo, tmp_path):
    _one_epoch(zoo + ZOO_LAYERS[name], name, tmp_path)


@pytest.mark.parametrize(
    "name,override,key",
    [
        ("rkd", "distill.terms.rkd.teacher=avgpol", "distill.terms.rkd.teacher"),
        ("cc", "distill.terms.cc.student=classifier.9", "distill.terms.cc.student"),
        ("nst", 'distill.terms.nst.pairs=["features.0:layer9"]', "distill.terms.nst.pairs.0.teacher"),
        ("fsp", 'distill.terms.fsp.pairs=["features.0:layer1","features.1:layer2"]', "distill.terms.fsp.pairs.0"),
        ("kdsvd", 'distill.terms.kdsvd.pairs=["features.0:layer1"]', "distill.terms.kdsvd.pairs"),
    ],
)
@pytest.mark.slow
def test_bad_settings_are_one_line_before_training(name, override, key, quickstart, tmp_path):
    """A wrong layer lists the valid names; FSP with the tiny CNN's 16 channels against resnet18's 64 names the
    widths; KDSVD with one pair asks for two. No stage has run: no checkpoint was written."""
    with pytest.raises(ConfigError) as err:
        runner.run(compose_config(quickstart + [f"distill={name}", override]), tmp_path)
    message = str(err.value)
    assert err.value.key == key and "\n" not in message, message
    if "pairs.0" in key and name == "fsp":
        assert "[16, 8, 8] and [64, 16, 16]" in message
    elif name != "kdsvd":
        assert "valid names:" in message
    assert not list(tmp_path.rglob("*.pt"))
