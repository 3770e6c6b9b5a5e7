"""Every user-facing key is validated before any work: one error naming the key, the value and the fix."""

import subprocess
import sys

import pytest
from conftest import compose_config

from distill_runner.config import validate
from distill_runner.errors import ConfigError

# (override, key the error must name, bad value it must show)
BAD = [
    ("seed=1.5", "seed", "1.5"),
    ("seed=-5", "seed", "-5"),
    ("+foo=1", "foo", "1"),
    ("+trainer.epoch=3", "trainer.epoch", "3"),
    ("+teacher.lr=0.1", "teacher.lr", "0.1"),
    ("trainer.optimizer.lr=inf", "trainer.optimizer.lr", "inf"),
    ("teacher.optimizer.weight_decay=nan", "teacher.optimizer.weight_decay", "nan"),
    ("distill.temperature=inf", "distill.temperature", "inf"),
    ("dataset.batch_size=0", "dataset.batch_size", "0"),
    ("dataset.eval_batch_size=-1", "dataset.eval_batch_size", "-1"),
    ("dataset.image_size=4", "dataset.image_size", "4"),
    ("dataset.limit=0", "dataset.limit", "0"),
    ("dataset=chest_xray dataset.val_from_train=1.5", "dataset.val_from_train", "1.5"),
    ("dataset=chest_xray dataset.balance=oversample", "dataset.balance", "oversample"),
    ("dataset=chest_xray dataset.on_bad_image=ignore", "dataset.on_bad_image", "ignore"),
    ("dataset=chest_xray dataset.num_workers=-2", "dataset.num_workers", "-2"),
    ("dataset=chest_xray dataset.pin_memory=maybe", "dataset.pin_memory", "maybe"),
    ("dataset=cifar10 dataset.download=yes", "dataset.download", "yes"),
    ("teacher.epochs=-1", "teacher.epochs", "-1"),
    ("teacher.checkpoint=/nonexistent/teacher.pt", "teacher.checkpoint", "/nonexistent/teacher.pt"),
    ("teacher.epochs=0", "teacher.epochs", "0"),
    ("teacher.optimizer.lr=0", "teacher.optimizer.lr", "0"),
    ("teacher.scheduler.warmup_epochs=99", "teacher.scheduler.warmup_epochs", "99"),
    ("student=mobilenet_v2 student.model.arch=resnet999", "student.model.arch", "resnet999"),
    ("distill.temperature=0", "distill.temperature", "0"),
    ("distill.temperature=hot", "distill.temperature", "hot"),
    ("distill.alpha=1.5", "distill.alpha", "1.5"),
    ("distill.teacher_outputs=sometimes", "distill.teacher_outputs", "sometimes"),
    ("cache.enabled=maybe", "cache.enabled", "maybe"),
    ("cache.teacher_outputs_dtype=int8", "cache.teacher_outputs_dtype", "int8"),
    ("cache.max_teacher_outputs_mb=-5", "cache.max_teacher_outputs_mb", "-5"),
    ("trainer.epochs=0", "trainer.epochs", "0"),
    ("trainer.device=tpu", "trainer.device", "tpu"),
    ("trainer.precision=fp8", "trainer.precision", "fp8"),
    ("trainer.progress=sometimes", "trainer.progress", "sometimes"),
    ("trainer.channels_last=1", "trainer.channels_last", "1"),
    ("trainer.compile=fastest", "trainer.compile", "fastest"),
    ("trainer.optimizer.lr=-0.1", "trainer.optimizer.lr", "-0.1"),
    ("trainer.optimizer.weight_decay=-1", "trainer.optimizer.weight_decay", "-1"),
    ("trainer.scheduler.warmup_epochs=-1", "trainer.scheduler.warmup_epochs", "-1"),
    ("export=tflite", "export", "tflite"),
    ("eval.latency_budget_s=0", "eval.latency_budget_s", "0"),
    ("eval.throughput_budget_s=-1", "eval.throughput_budget_s", "-1"),
    ("eval.cka_samples=1", "eval.cka_samples", "1"),
]


@pytest.mark.slow
@pytest.mark.parametrize("override,key,value", BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_key_value_and_fix(override, key, value):
    cfg = compose_config(override.split())
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    message = str(err.value)
    assert message.startswith(f"{key}=") and value in message and "\n" not in message
    assert len(err.value.fix) > 10  # says what to do


def test_the_shipped_configs_pass():
    for experiment in ("quickstart", "xray_kd", "cifar10_kd", "cifar100_kd"):
        validate(compose_config(experiment=experiment))


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config_without_running(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distill_runner", "--cfg", "job", "trainer.compile=true", "distill.temperature=8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "compile: true" in proc.stdout
        and "temperature: 8" in proc.stdout
        and "_target_: distill_runner.distill.terms.HintonKD" in proc.stdout
    )
    assert not (tmp_path / "outputs").exists()


def test_an_unread_key_suggests_the_key_meant():
    with pytest.raises(
        ConfigError, match=r"trainer.epoch=3: no part of distill-runner reads this key; did you mean trainer.epochs\?"
    ):
        validate(compose_config(["+trainer.epoch=3"]))
