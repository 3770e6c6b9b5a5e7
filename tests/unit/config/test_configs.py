"""Every shipped config composes and builds; the config tree ships inside the package."""

from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from fake_data import make_cifar, make_xray_folder, skip_cifar_md5

from distill_runner import build

CONF = Path(__file__).resolve().parents[3] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# The CIFAR-100 zoo (conf/student/<zoo>.yaml, built at 32 px against the reference code) is tested in test_cifar_zoo.py.
STUDENTS = sorted(p.stem for p in (CONF / "student").glob("*.yaml") if "models.cifar." not in p.read_text())


def test_no_argument_run_is_the_quickstart():
    cfg = compose_config()
    assert cfg.dataset.name == "digits" and cfg.teacher.model.arch == "resnet18" and cfg.student.name == "tiny_cnn"
    assert cfg.distill.terms.kd._target_.endswith("HintonKD")


def data_overrides(experiment: str, tmp_path, monkeypatch) -> list[str]:
    """Experiments on real data sets get a tiny copy in the real on-disk format (and no downloads)."""
    if experiment.startswith("xray"):
        return [
            f"dataset.root={make_xray_folder(tmp_path / 'chest_xray')}",
            "teacher.weights=null",
            "dataset.num_workers=0",
        ]
    if experiment.startswith("cifar"):
        skip_cifar_md5(monkeypatch)
        variant = experiment.split("_")[0]
        make_cifar(tmp_path, variant, per_class=10)
        return [f"dataset.root={tmp_path}", "dataset.download=false"]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(experiment, tmp_path, monkeypatch):
    cfg = compose_config(
        ["dataset.limit=8", "dataset.image_size=16", *data_overrides(experiment, tmp_path, monkeypatch)],
        experiment=experiment,
    )
    data = build.build_data(cfg)
    teacher = build.build_teacher(cfg.teacher, "teacher", data, cfg.seed)
    student = build.build_model(cfg.student, "student", data, cfg.seed)
    build.build_recipe(cfg, data, student)
    batch = next(iter(data.train))
    assert batch["image"].shape[1:] == (data.in_channels, data.image_size, data.image_size)
    for model in (teacher, student):
        assert model.eval()(batch["image"]).shape == (len(batch["target"]), data.num_classes)


@pytest.mark.slow
@pytest.mark.parametrize("student", STUDENTS)
@pytest.mark.parametrize("image_size", [32, 224])
def test_students_build_for_the_data_set(student, image_size):
    cfg = compose_config([f"student={student}", f"dataset.image_size={image_size}", "dataset.limit=4"])
    data = build.build_data(cfg)
    model = build.build_model(cfg.student, "student", data, cfg.seed).eval()
    assert model(torch.zeros(2, 3, image_size, image_size)).shape == (2, 10)


def test_user_facing_keys_exist():
    cfg = compose_config(
        [
            "distill.temperature=8",
            "distill.alpha=0.25",
            "trainer.epochs=2",
            "trainer.device=cpu",
            "trainer.precision=bf16-mixed",
            "teacher.epochs=0",
            "teacher.weights=IMAGENET1K_V1",
            "teacher.checkpoint=/tmp/x.pt",
            "dataset.root=/data",
            "dataset.batch_size=8",
            "seed=3",
        ]
    )
    assert (cfg.distill.temperature, cfg.distill.alpha, cfg.trainer.epochs, cfg.seed) == (8, 0.25, 2, 3)
    assert cfg.teacher.weights == "IMAGENET1K_V1" and cfg.teacher.checkpoint == "/tmp/x.pt"


@pytest.mark.slow
def test_the_wheel_ships_every_config_file(tmp_path):
    """A plain `pip install .` must find conf/ too: build the wheel and look inside."""
    import subprocess
    import sys
    import zipfile

    root = CONF.parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(root),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("distill_runner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in CONF.rglob("*.yaml"):
        assert "distill_runner/conf/" + path.relative_to(CONF).as_posix() in names, f"{path} is not in the wheel"
    assert "distill_runner/conf/__init__.py" in names


def test_every_config_file_ships_in_the_package():
    shipped = resources.files("distill_runner.conf")
    for path in CONF.rglob("*.yaml"):
        assert shipped.joinpath(*path.relative_to(CONF).parts).is_file(), f"{path} is not package data"
    assert (CONF / "__init__.py").is_file()
