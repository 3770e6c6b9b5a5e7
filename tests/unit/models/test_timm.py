"""timm models as teacher or student: built offline, their module paths usable in feature recipes,
pretrained weights through timm's own loading with a one-line error when offline."""

import math

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner import build, runner
from distill_runner.errors import ConfigError

timm = pytest.importorskip("timm")
from distill_runner.models.timm_models import timm_model  # noqa: E402  (after the skip: it needs timm)


@pytest.mark.slow
def test_a_timm_teacher_with_a_feature_recipe_for_one_epoch(tmp_path):
    # the feature recipe's teacher layers (layer2, layer3) are timm's ResNet module paths as they are
    cfg = compose_config([*TINY, "teacher=timm", "distill=feature", "cache.enabled=false"])
    results = runner.run(cfg, tmp_path / "run")
    assert results.models["teacher"].name == "timm:resnet18"
    (epoch,) = results.stages["student"].history
    assert math.isfinite(epoch["loss/feature"]) and epoch["loss/feature"] > 0
    assert results.stages["teacher"].epochs == 1 and 0 <= results.models["student"].test_acc <= 1


def test_a_timm_students_module_paths_name_feature_layers():
    cfg = compose_config(
        ["dataset.image_size=16", "dataset.limit=16", "student=timm", "distill=feature",
         "distill.terms.feature.pairs=[{student: layer2, teacher: layer2}, {student: layer3.0.conv1, teacher: layer3}]"]
    )  # fmt: skip
    data = build.build_data(cfg)
    student = build.build_student(cfg.student, data, cfg.seed)
    build.build_recipe(cfg, data, student)  # checks the layer names and builds the adapters

    bad = cfg.copy()
    bad.distill.terms.feature.pairs[0].student = "features.0"
    with pytest.raises(ConfigError, match=r"no such layer in the student \(ResNet\); valid names: conv1, .*, layer1, "):
        build.build_recipe(bad, data, student)


def test_models_that_cannot_take_small_images_say_so_and_vits_are_built_for_the_size():
    with pytest.raises(ConfigError, match=r"convnext_atto.*does not run on 16 px images .*larger dataset\.image_size"):
        timm_model("convnext_atto", num_classes=10, image_size=16)
    vit = timm_model("vit_tiny_patch16_224", num_classes=10, image_size=32)  # position embeddings for 2x2 patches
    assert vit.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    gray = timm_model("resnet10t", num_classes=3, in_channels=1, image_size=16)
    assert gray.eval()(torch.zeros(1, 1, 16, 16)).shape == (1, 3)


def test_unknown_name_or_tag_lists_what_there_is():
    cfg = compose_config(["student=timm", "student.model.name=resnet19", "dataset.limit=4"])
    with pytest.raises(ConfigError, match=r"student\.model\.name='resnet19': not a timm model; did you mean resnet"):
        build.build_student(cfg.student, build.build_data(cfg), cfg.seed)
    cfg = compose_config(["teacher=timm", "teacher.weights=IMAGENET1K_V1", "dataset.limit=4"])
    with pytest.raises(ConfigError, match=r"teacher\.weights='IMAGENET1K_V1': timm has no weights .*tags: a1_in1k"):
        build.build_teacher(cfg.teacher, "teacher", build.build_data(cfg), cfg.seed)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network: the hub in offline mode, an empty hub cache and torch hub folder of the test's own."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_pretrained_offline_is_one_line_that_says_where_the_file_goes(offline):
    cfg = compose_config(["teacher=timm", "teacher.weights=a1_in1k", "dataset.limit=4"])
    with pytest.raises(ConfigError) as err:
        build.build_teacher(cfg.teacher, "teacher", build.build_data(cfg), cfg.seed)
    message = str(err.value)
    assert err.value.key == "teacher.weights" and "\n" not in message
    assert "resnet18.a1_in1k" in message and str(offline / "hf" / "models--timm--resnet18.a1_in1k") in message
    assert "+teacher.model.pretrained_cfg_overlay.file=PATH" in message and message.endswith("set teacher.weights=null")

    cfg = compose_config(["student=timm", "student.model.pretrained=true", "dataset.limit=4"])
    with pytest.raises(ConfigError, match=r"^student\.model\.pretrained=True: timm could not get the pretrained"):
        build.build_student(cfg.student, build.build_data(cfg), cfg.seed)


def test_pretrained_weights_from_a_file_load_offline(offline):
    imagenet = timm.create_model("resnet10t").state_dict()  # stands in for the downloaded file
    torch.save(imagenet, offline / "resnet10t.pth")
    cfg = compose_config(
        ["student=timm", "student.model.pretrained=true", "dataset.limit=4", "dataset.image_size=16",
         f"+student.model.pretrained_cfg_overlay.file={offline / 'resnet10t.pth'}"]
    )  # fmt: skip
    model = build.build_student(cfg.student, build.build_data(cfg), cfg.seed)
    assert torch.equal(model.layer1[0].conv1.weight, imagenet["layer1.0.conv1.weight"])
    assert model.fc.out_features == 10  # timm's own head for the data set's classes
