"""Every loader implements the whole Batches protocol, and a KD run (teacher, then distillation, replayed where
the loader allows it) runs on each: the decoded store, PIL with data.decode_cache=false, the store held on the
device, and the PIL fallback when the store does not fit on the disk (both crashed: 'FolderBatches' object has no
attribute 'num_samples' / 'distinct_epochs')."""

import inspect
import logging
import re

import pytest
import torch
from conftest import TINY_IMAGES, compose_config
from fake_data import make_xray_folder

from distill_runner import runner
from distill_runner.cli import command_line
from distill_runner.data import decode_cache
from distill_runner.data.batches import Batches
from distill_runner.data.bundle import TensorBatches
from distill_runner.data.digits import digits
from distill_runner.data.folder_batches import FolderBatches
from distill_runner.data.imagefolder import imagefolder

MEMBERS = ("batch_size", "replayable", "holds_images", "set_epoch", "shard", "num_samples", "nbytes",
           "distinct_epochs", "place", "__len__", "__iter__", "set_strong")  # fmt: skip


def test_the_member_list_is_the_protocol():
    """MEMBERS (checked on every loader below) is exactly what Batches declares, and each member says what it is
    (an attribute's comment, a method's docstring)."""
    machinery = {"__init__", "__subclasshook__"}  # what typing.Protocol adds
    methods = {k for k, v in vars(Batches).items() if isinstance(v, property) or inspect.isfunction(v)} - machinery
    assert set(Batches.__annotations__) | methods == set(MEMBERS)
    source = inspect.getsource(Batches)
    for name in MEMBERS:
        assert re.search(rf"\n    {name}: \w+ +# \w", source) or inspect.getdoc(vars(Batches).get(name)), name


def check_batches(loader, image_size: int) -> None:
    assert isinstance(loader, Batches) and all(hasattr(loader, m) for m in MEMBERS)
    assert loader.nbytes >= loader.num_samples * image_size**2 > 0
    assert loader.distinct_epochs in (1, None) and isinstance(loader.replayable, bool)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) and sum(len(b["target"]) for b in batches) == loader.num_samples
    assert {"image", "target", "index"} <= set(batches[0]) and batches[0]["image"].shape[-1] == image_size
    assert loader.place("cpu", resident=False) is loader
    loader.shard(0, 2, pad=False)
    assert sum(len(b["target"]) for b in loader) == (loader.num_samples + 1) // 2
    loader.shard(0, 1)


@pytest.mark.parametrize("decode", [True, False])
def test_imagefolder_loaders_implement_the_protocol(tmp_path, decode):
    root = make_xray_folder(tmp_path / "xray")
    data = imagefolder(root=str(root), image_size=16, num_workers=0, decode_cache=decode, progress=False)
    assert isinstance(data.train, TensorBatches if decode else FolderBatches)
    for loader in (data.train, data.val, data.test):
        check_batches(loader, 16)
    assert data.train.distinct_epochs is None and data.val.distinct_epochs == 1  # hflip on train only
    assert data.train.holds_images == decode and data.train.replayable == decode
    if not decode:
        with pytest.raises(ValueError):
            data.train.place("cpu", resident=True)


def test_tensor_batches_implement_the_protocol():
    data = digits(image_size=8, batch_size=16, limit=40)
    for loader in (data.train, data.val, data.test):
        check_batches(loader, 8)
    assert data.train.place("cpu", resident=True).images.shape[0] == data.train.num_samples


def xray_cfg(root, *extra):
    overrides = [*TINY_IMAGES, "dataset.image_size=16", "teacher=wide_cnn", "teacher.weights=null"]
    return compose_config([*overrides, f"dataset.root={root}", "dataset.num_workers=0", *extra], "xray_kd")


@pytest.mark.parametrize(
    "loader,extra,says",
    [
        ("store", [], "teacher outputs: cached"),
        ("pil", ["data.decode_cache=false"], "teacher outputs: online (the training loader cannot replay"),
        ("on_device", ["data.on_device=true"], "held on cpu as one tensor"),
        ("disk_full", [], "decoding with PIL on the fly instead"),
    ],
)
@pytest.mark.slow
def test_a_kd_run_works_on_every_loader(tmp_path, monkeypatch, caplog, loader, extra, says):
    root = make_xray_folder(tmp_path / "xray")
    if loader == "disk_full":  # the fallback the store's warning promises
        real = decode_cache.shutil.disk_usage
        full = lambda p: real(p)._replace(free=1000) if "decoded" in str(p) else real(p)  # the store's disk alone
        monkeypatch.setattr(decode_cache.shutil, "disk_usage", full)
    with caplog.at_level(logging.INFO):
        results = runner.run(xray_cfg(root, *extra), tmp_path / "run")
    assert says in caplog.text and "student epoch 1/1" in caplog.text
    assert set(results.models) == {"teacher", "student", "baseline"}
    assert all(0 <= m.test_acc <= 1 for m in results.models.values())
    assert results.class_counts["test"] == [3, 3]


def test_place_asks_the_loader_not_hasattr(tmp_path, caplog):
    root = make_xray_folder(tmp_path / "xray")
    data = imagefolder(root=str(root), image_size=16, num_workers=0, decode_cache=False)
    with caplog.at_level(logging.INFO):
        data.place(torch.device("cpu"), on_device=True)
    assert "data.on_device=true ignored" in caplog.text


@pytest.mark.parametrize(
    "loader,extra,says",
    [
        ("store", [], "teacher outputs: cached"),
        ("pil", ["data.decode_cache=false"], "teacher outputs: online (the training loader cannot replay"),
        ("on_device", ["data.on_device=true"], "held on cpu as one tensor"),
    ],
)
@pytest.mark.slow
def test_the_quickstart_pipeline_runs_on_every_loader(tmp_path, caplog, loader, extra, says):
    """The quickstart's pipeline (ResNet-18 teacher fine-tuned, tiny-CNN student, Hinton KD with replayed teacher
    outputs where the loader allows, the baseline, the evaluation and the report) on an image folder, composed as
    ``distill-run dataset=imagefolder dataset.root=... <loader's keys>`` is, end to end on each loader."""
    root = make_xray_folder(tmp_path / "xray")
    args = ["dataset=imagefolder", f"dataset.root={root}", *TINY_IMAGES, "dataset.num_workers=0", *extra]
    with caplog.at_level(logging.INFO):
        results = runner.run(compose_config(command_line(args)), tmp_path / "run")
    assert says in caplog.text and "student epoch 1/1" in caplog.text
    assert results.dataset == "imagefolder" and results.models["teacher"].name == "resnet18"
    assert set(results.models) == {"teacher", "student", "baseline"}
    assert all(0 <= m.test_acc <= 1 for m in results.models.values())
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "metrics.json").is_file()
