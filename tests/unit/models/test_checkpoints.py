"""Weights trained elsewhere load as teacher or student: every supported file layout round-trips, and a
file that does not fit, or that holds more than weights, is refused in one line.

The layouts of other projects' files follow their saving code (read, not run: their training needs GPUs
and CIFAR): RepDistiller train_teacher.py at 7fd6effe626724b94587378aa12045fb3da029a6 saves
``<model>_best.pth``/``ckpt_epoch_<n>.pth`` as ``{"epoch", "model", "best_acc"|"accuracy", "optimizer"}``
and ``<model>_last.pth`` as ``{"opt": argparse.Namespace, "model", "optimizer"}``; mdistiller
mdistiller/engine/trainer.py at e8c5bb331e78c9d79a8894ca233caae78531cf7f saves the DataParallel-wrapped
distiller's state_dict (``module.student.*`` and ``module.teacher.*``) as ``{"epoch", "model",
"optimizer", "best_acc"}``. Lightning's ``{"state_dict": ...}`` carries the LightningModule's attribute
names (``model.``, ``net.``) as prefixes.
"""

import argparse
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import compose_config
from torch import nn

from distill_runner import build, runner
from distill_runner.errors import ConfigError
from distill_runner.io import cache
from distill_runner.models.checkpoints import load_checkpoint
from distill_runner.models.factories import tiny_cnn, torchvision_model


def _model(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_cnn(num_classes=classes)


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _optimizer_state(model: nn.Module) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.zeros(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def _opt() -> argparse.Namespace:
    """Training arguments as RepDistiller (``opt``) and timm's train.py (``args``) keep them."""
    return argparse.Namespace(
        model="resnet8x4", learning_rate=0.05, lr_decay_epochs=[150, 180, 210], dataset="cifar100"
    )


# name -> what the file holds, given the trained model (each as its project writes it)
LAYOUTS = {
    "plain state_dict": lambda m: m.state_dict(),
    "RepDistiller <model>_best.pth": lambda m: {"epoch": 240, "model": m.state_dict(), "best_acc": torch.tensor(75.2),
                                                 "optimizer": _optimizer_state(m)},
    "RepDistiller <model>_last.pth (argparse.Namespace)": lambda m: {"opt": _opt(), "model": m.state_dict(),
                                                                    "optimizer": _optimizer_state(m)},
    "mdistiller distiller checkpoint": lambda m: {
        "epoch": 240, "optimizer": _optimizer_state(m), "best_acc": 71.3,
        "model": {**_prefixed(m.state_dict(), "module.student."),
                  **_prefixed(torchvision_model("resnet18", 10, image_size=16).state_dict(), "module.teacher.")}},
    "mdistiller student_best": lambda m: {"model": m.state_dict()},
    "Lightning model.": lambda m: {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0",
                                   "state_dict": _prefixed(m.state_dict(), "model."), "optimizer_states": [],
                                   "lr_schedulers": [], "hyper_parameters": {"lr": 0.1, "arch": "tiny_cnn"}},
    "Lightning net.": lambda m: {"epoch": 3, "state_dict": _prefixed(m.state_dict(), "net.")},
    "DataParallel module.": lambda m: nn.DataParallel(m).state_dict(),
    "torch.compile _orig_mod.": lambda m: torch.compile(m).state_dict(),
    "DDP of a compiled model module._orig_mod.": lambda m: nn.DataParallel(torch.compile(m)).state_dict(),
    "timm train.py checkpoint": lambda m: {"epoch": 9, "arch": "tiny_cnn", "state_dict": m.state_dict(),
                                           "optimizer": _optimizer_state(m), "version": 2, "args": _opt()},
    "model_state_dict (PyTorch tutorial)": lambda m: {"model_state_dict": m.state_dict(), "epoch": 1, "loss": 0.4},
}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_round_trips(layout, tmp_path):
    trained = _model(seed=1)
    path = tmp_path / "weights.pt"
    torch.save(LAYOUTS[layout](trained), path)
    fresh = _model(seed=2)
    load_checkpoint(fresh, path)
    for (name, expected), found in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(expected, found), f"{layout}: {name} differs"


def test_safetensors_round_trips_and_a_damaged_one_is_one_line(tmp_path):
    trained = _model(seed=1)
    safetensors.torch.save_file(_prefixed(trained.state_dict(), "module."), tmp_path / "t.safetensors")
    fresh = _model(seed=2)
    load_checkpoint(fresh, tmp_path / "t.safetensors", key="student.checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))

    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConfigError, match="could not be read as a safetensors file") as err:
        load_checkpoint(fresh, tmp_path / "bad.safetensors", key="student.checkpoint")
    assert err.value.key == "student.checkpoint" and "\n" not in str(err.value)


def test_the_log_says_which_container_and_prefix_and_what_was_left_out(tmp_path, caplog):
    torch.save(LAYOUTS["mdistiller distiller checkpoint"](_model()), tmp_path / "latest")
    with caplog.at_level(logging.INFO, logger="distill_runner.models.checkpoints"):
        load_checkpoint(_model(), tmp_path / "latest")
    line = caplog.records[-1].getMessage()
    assert "state_dict in 'model'" in line and "prefix 'module.student.' stripped" in line
    assert "keys without it left out (e.g. module.teacher." in line


def test_keys_that_still_do_not_fit_name_the_first_bad_key_and_the_prefix(tmp_path):
    state = _prefixed(_model().state_dict(), "encoder.")
    del state["encoder.classifier.4.bias"]
    torch.save({"state_dict": state}, tmp_path / "enc.ckpt")
    with pytest.raises(ConfigError) as err:
        load_checkpoint(_model(), tmp_path / "enc.ckpt", key="student.checkpoint")
    message = str(err.value)
    assert err.value.key == "student.checkpoint" and "\n" not in message
    assert (
        "compared after stripping prefix 'encoder.'" in message
        and "1 missing keys, first 'classifier.4.bias'" in message
    )

    wide = tiny_cnn(num_classes=10, channels=(16, 48))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match=r"shape mismatch: features\.1\.0\.weight \(48, 16, 3, 3\) in file"):
        load_checkpoint(_model(), tmp_path / "wide.pt")

    torch.save(_model(classes=100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(ConfigError, match="the checkpoint has 100 classes, the data set has 10"):
        load_checkpoint(_model(), tmp_path / "c100.pt")

    torch.save(torchvision_model("resnet18", 10, image_size=16).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ConfigError, match="no key of the file is a key of the model, under any prefix"):
        load_checkpoint(_model(), tmp_path / "resnet.pt")


def test_a_distillers_checkpoint_with_two_fitting_parts_is_not_guessed(tmp_path):
    state = {
        **_prefixed(_model(1).state_dict(), "module.student."),
        **_prefixed(_model(2).state_dict(), "module.teacher."),
    }
    torch.save({"model": state}, tmp_path / "best")
    with pytest.raises(ConfigError, match="fit the model under 'module.student.' and 'module.teacher.'"):
        load_checkpoint(_model(), tmp_path / "best")


class Payload:
    """Unpickling this would create a file: weights_only loading must refuse it before."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.makedirs, (str(self.flag),))


def test_pickled_objects_other_than_training_arguments_are_refused(tmp_path):
    flag = tmp_path / "ran"
    torch.save({"model": _model().state_dict(), "hook": Payload(flag)}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match=r"holds a pickled os\.makedirs, which loading with weights_only refuses"):
        load_checkpoint(_model(), tmp_path / "evil.pt")
    assert not flag.exists()

    torch.save(_model(), tmp_path / "whole_model.pt")  # torch.save(model): a pickle of the class, not weights
    with pytest.raises(
        ConfigError, match=r"pickled distill_runner\.models\.factories\.TinyCNN.*torch\.save\(model\.state"
    ):
        load_checkpoint(_model(), tmp_path / "whole_model.pt")

    torch.save({"epoch": 3, "acc": 0.9}, tmp_path / "no_weights.pt")
    with pytest.raises(ConfigError, match=r"keys \[epoch, acc\] and none is a state_dict"):
        load_checkpoint(_model(), tmp_path / "no_weights.pt")


def _write_student(path: Path, seed: int) -> dict:
    cfg = compose_config(["dataset.image_size=16", "dataset.limit=16"])
    torch.manual_seed(seed)
    state = build.build_model(cfg.student, "student", build.build_data(cfg), seed).state_dict()
    torch.save({"model": _prefixed(state, "module.")}, path)
    return state


def test_student_checkpoint_starts_both_the_kd_student_and_the_baseline(tmp_path, fast):
    state = _write_student(tmp_path / "student.pth", seed=5)
    cfg = compose_config([*fast, f"student.checkpoint={tmp_path / 'student.pth'}"])
    runner.validate(cfg)
    ctx = runner.prepare(cfg, tmp_path / "run", [])
    built = runner.build(ctx)
    for role in (built.student, built.baseline):
        assert all(torch.equal(state[k], v) for k, v in role.state_dict().items())


@pytest.mark.slow
def test_checkpoint_contents_key_the_cached_teacher_and_baseline(tmp_path):
    """An edited file (same path) never reuses a stale teacher or baseline; the same bytes elsewhere do."""
    a, copy = tmp_path / "a.pt", tmp_path / "elsewhere" / "a.pt"
    _write_student(a, seed=1)
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    keys = lambda *o: (
        cache.teacher_key(compose_config(list(o)), "teacher", "f"),
        cache.baseline_key(compose_config(list(o)), "f"),
    )
    none, student_a, student_copy = keys(), keys(f"student.checkpoint={a}"), keys(f"student.checkpoint={copy}")
    assert student_a[0] == none[0] and student_a[1] != none[1] and student_copy == student_a
    _write_student(a, seed=2)  # the same path, new weights
    assert keys(f"student.checkpoint={a}")[1] != student_a[1]
    teacher_a = keys(f"teacher.checkpoint={a}")
    _write_student(a, seed=3)
    teacher_edited = keys(f"teacher.checkpoint={a}")
    assert teacher_a[0] != none[0] and teacher_edited[0] != teacher_a[0] and teacher_edited[1] == none[1]


def test_a_missing_student_checkpoint_stops_before_any_work():
    with pytest.raises(ConfigError, match=r"^student\.checkpoint='/nonexistent/s\.pt': no such file") as err:
        runner.validate(compose_config(["student=mobilenet_v2", "student.checkpoint=/nonexistent/s.pt"]))
    assert "\n" not in str(err.value)
