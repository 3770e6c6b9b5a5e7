"""WSLD, SRD and KD with the DOT optimizer run one epoch end to end on digits with the quickstart pair (resnet18 ->
tiny CNN) and with a CIFAR-zoo pair (resnet20 -> resnet8); bad settings (a layer that does not exist, DOT with a
recipe without a distillation term, with 16-bit gradient scaling, with a delta the momentum cannot hold) are one
line before any training."""

import math

import pytest
from conftest import compose_config
from one_epoch import ZOO, one_epoch, teacher_fixture

from distill_runner import runner
from distill_runner.errors import ConfigError
from distill_runner.train.optimizers import DOT

DOT_KD = ["distill=kd", "+trainer/optimizer=dot"]
RUNS = {"wsld": ["distill=wsld"], "srd": ["distill=srd"], "kd_dot": DOT_KD, "srd_dot": ["distill=srd", DOT_KD[1]]}
ZOO_LAYERS = ["distill.terms.srd.student=layer3", "distill.terms.srd.teacher=layer3"]  # the last stage, pooled


quickstart = teacher_fixture([])
zoo = teacher_fixture(ZOO)


def _one_epoch(overrides, tmp_path):
    cfg = compose_config(overrides)
    _, record = one_epoch(cfg, tmp_path)
    assert math.isfinite(record["loss/total"]), record
    return cfg, record


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_one_epoch_with_the_quickstart_pair(name, quickstart, tmp_path):
    cfg, record = _one_epoch(quickstart + RUNS[name], tmp_path)
    term = next(t for t in cfg.distill.terms if t != "ce")
    assert math.isfinite(record[f"loss/{term}"])


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_one_epoch_with_a_cifar_zoo_pair(name, zoo, tmp_path):
    _one_epoch(zoo + RUNS[name] + (ZOO_LAYERS if "srd" in name else []), tmp_path)


@pytest.mark.slow
def test_dot_trains_in_the_loop_with_both_momenta(quickstart, tmp_path, monkeypatch):
    """The KD stage steps DOT with the distillation gradients stashed (both buffers on the shared parameters); the
    scratch baseline (cross-entropy alone) steps it with none: SGD with its one momentum."""
    seen = []
    step = DOT.step

    def recorded(self, closure=None):
        seen.append((len(self._distill), {k for v in self.state.values() for k in v}))
        return step(self, closure)

    monkeypatch.setattr(DOT, "step", recorded)
    runner.run(compose_config(quickstart + DOT_KD), tmp_path)
    assert any(stashed for stashed, _ in seen) and any(not stashed for stashed, _ in seen)
    assert any(keys == {"momentum_buffer", "momentum_kd_buffer"} for stashed, keys in seen if stashed)
    assert all(keys <= {"momentum_buffer"} for stashed, keys in seen if not stashed)


@pytest.mark.parametrize(
    "extra,key,words",
    [
        (["distill=srd", "distill.terms.srd.teacher=layer9"], "distill.terms.srd.teacher", "valid names:"),
        ([*DOT_KD, "~distill.terms.kd"], "trainer.optimizer._target_", "no distillation term"),
        ([*DOT_KD, "trainer.precision=16-mixed"], "trainer.precision", "bf16-mixed"),
        ([*DOT_KD, "trainer.optimizer.delta=0.2"], "trainer.optimizer.delta", "[0, 0.1]"),
    ],
)
def test_bad_settings_are_one_line_before_training(extra, key, words, quickstart, tmp_path):
    with pytest.raises(ConfigError) as err:
        runner.run(compose_config(quickstart + extra), tmp_path)
    message = str(err.value)
    assert err.value.key == key and "\n" not in message and words in message, message
    assert not list(tmp_path.rglob("*.pt"))
