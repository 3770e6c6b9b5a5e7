"""experiment=cifar100_bench: the CIFAR-100 protocol (multi-step SGD schedule, all training images, test accuracy
every epoch, best- and last-epoch in the report), run small on a CIFAR-100-format folder made here."""

import json

import pytest
import torch
from conftest import compose_config
from fake_data import make_cifar, skip_cifar_md5

from distill_runner import runner
from distill_runner.build import build_data
from distill_runner.errors import ConfigError
from distill_runner.train.engine import multistep

# A run of seconds: the smallest zoo ResNet as teacher and student, 2 epochs, short timing budgets.
SMALL = ["teacher=cifar_resnet8", "student=cifar_resnet8", "teacher.epochs=1", "trainer.epochs=2",
         "trainer.progress=false", "dataset.download=false", "eval.latency_budget_s=0.01",
         "eval.throughput_budget_s=0.01", "dataset.eval_batch_size=100"]  # fmt: skip


def test_multistep_decays_at_the_milestone_epochs_stepped_per_batch():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    scheduler = multistep(optimizer, epochs=8, steps_per_epoch=3, milestones=[2, 5], gamma=0.1)
    lrs = []
    for _ in range(8 * 3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    per_epoch = [lrs[e * 3 : e * 3 + 3] for e in range(8)]
    assert all(len(set(e)) == 1 for e in per_epoch)  # constant within an epoch
    # RepDistiller: lr * 0.1 ** sum(epoch > milestones) with 1-based epochs, i.e. 0-based epoch >= milestone
    expected = [0.05 * 0.1 ** sum(e + 1 > m for m in (2, 5)) for e in range(8)]
    assert [e[0] for e in per_epoch] == pytest.approx(expected)


@pytest.mark.parametrize("milestones,gamma", [([180, 150], 0.1), ([0], 0.1), ([150], 0.0)])
def test_multistep_refuses_bad_settings(milestones, gamma):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    with pytest.raises(ConfigError):
        multistep(optimizer, epochs=240, steps_per_epoch=10, milestones=milestones, gamma=gamma)


def test_the_protocol_is_what_the_papers_use():
    cfg = compose_config(["student=cifar_ShuffleV2", "teacher=cifar_wrn_40_2"], experiment="cifar100_bench")
    for node in (cfg.teacher, cfg.trainer):
        assert node.epochs == 240 and list(node.scheduler.milestones) == [150, 180, 210] and node.scheduler.gamma == 0.1
        assert node.optimizer._target_ == "torch.optim.SGD" and node.optimizer.momentum == 0.9
        assert node.optimizer.weight_decay == 5e-4 and node.optimizer.nesterov is False
    assert cfg.teacher.optimizer.lr == 0.05 and cfg.trainer.optimizer.lr == 0.01  # ShuffleNet student: 0.01
    assert compose_config(["student=cifar_resnet20"], experiment="cifar100_bench").trainer.optimizer.lr == 0.05
    assert cfg.dataset.batch_size == 64 and cfg.dataset.crop_padding == 4 and cfg.dataset.hflip
    assert cfg.dataset.val_from_train == 0 and cfg.eval.test_every_epoch is True


def test_val_from_train_0_trains_on_every_image_and_validates_on_test(tmp_path, monkeypatch):
    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path, "cifar100", per_class=2)
    cfg = compose_config([f"dataset.root={tmp_path}", "dataset.download=false"], experiment="cifar100_bench")
    data = build_data(cfg)
    assert data.class_counts["train"] == [2] * 100 and data.class_counts["val"] == data.class_counts["test"]
    assert torch.equal(data.val.images, data.test.images)


@pytest.mark.slow
def test_cifar100_bench_smoke_run_reports_best_and_last_epoch_test_accuracy(tmp_path, monkeypatch):
    skip_cifar_md5(monkeypatch)
    make_cifar(tmp_path / "data", "cifar100", per_class=1)
    overrides = [f"dataset.root={tmp_path / 'data'}", *SMALL]
    results = runner.run(compose_config(overrides, experiment="cifar100_bench"), tmp_path / "run", overrides)
    for name, epochs in (("teacher", 1), ("student", 2), ("baseline", 2)):
        stage = results.stages[name]
        tested = [h["test/acc"] for h in stage.history]
        assert len(tested) == epochs and stage.last_test_acc == tested[-1]
        assert stage.best_test_acc == max(tested) and tested[stage.best_test_epoch - 1] == max(tested)
    assert results.models["student"].name == "resnet8"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["student"]
    assert saved["best_test_acc"] == results.stages["student"].best_test_acc
    report = (tmp_path / "run" / "report.md").read_text()
    assert "best-epoch test acc (epoch)" in report and "last-epoch test acc" in report
