import pytest
import torch
import torchvision
from conftest import compose_config
from omegaconf import OmegaConf
from torch import nn

from distill_runner import build
from distill_runner.errors import ConfigError, instantiate
from distill_runner.models.checkpoints import load_checkpoint
from distill_runner.models.factories import architecture, count_parameters, tiny_cnn, torchvision_model


@pytest.mark.parametrize("image_size", [32, 224])
def test_tiny_cnn_is_about_100k_parameters_at_any_size(image_size):
    model = tiny_cnn(num_classes=2, image_size=image_size)
    assert 80_000 <= count_parameters(model) <= 120_000
    assert model(torch.zeros(1, 3, image_size, image_size)).shape == (1, 2)


def test_resnet18_small_stem_for_small_images():
    small = torchvision_model("resnet18", num_classes=10, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert small.fc.out_features == 10
    big = torchvision_model("resnet18", num_classes=2, image_size=224)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)


def test_mobilenet_width_multiplier_shrinks_the_model():
    half = torchvision_model("mobilenet_v3_small", num_classes=10, image_size=32, width_mult=0.5)
    full = torchvision_model("mobilenet_v3_small", num_classes=10, image_size=32, width_mult=1.0)
    assert count_parameters(half) < count_parameters(full)


def test_unknown_arch_names_the_key():
    with pytest.raises(ConfigError, match="arch"):
        torchvision_model("resnet999", num_classes=10)


def _fake_imagenet_file(tmp_path, monkeypatch):
    """Put a (random) ResNet-18 ImageNet state_dict where torchvision looks for the download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    target = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return state


def test_imagenet_weights_load_through_torchvision_and_get_a_new_head(tmp_path, monkeypatch):
    state = _fake_imagenet_file(tmp_path, monkeypatch)
    model = torchvision_model("resnet18", num_classes=2, image_size=224, weights="IMAGENET1K_V1")
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(model.conv1.weight, state["conv1.weight"])  # 224 px keeps the pretrained stem
    assert model.fc.out_features == 2


def test_offline_weights_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    from urllib.error import URLError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    cfg = compose_config(["teacher.weights=IMAGENET1K_V1", "dataset.limit=4"])
    data = build.build_data(cfg)
    with pytest.raises(ConfigError) as err:
        build.build_teacher(cfg.teacher, "teacher", data, cfg.seed)
    message = str(err.value)
    assert err.value.key == "teacher.weights"
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "teacher.weights=null" in message or "weights=null" in message
    assert "\n" not in message


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        torchvision_model("resnet18", num_classes=2, weights="IMAGENET_V9")


def test_checkpoint_round_trip_and_mismatch_messages(tmp_path):
    model = torchvision_model("resnet18", num_classes=10, image_size=32)
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    other = torchvision_model("resnet18", num_classes=10, image_size=32)
    load_checkpoint(other, path)
    assert torch.equal(other.fc.weight, model.fc.weight)

    wrong_classes = torchvision_model("resnet18", num_classes=2, image_size=32)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(wrong_classes, path)
    assert (
        "fc.weight (10, 512) in file vs (2, 512) in model" in str(err.value) and err.value.key == "teacher.checkpoint"
    )

    with pytest.raises(ConfigError, match="unexpected keys|missing keys"):
        load_checkpoint(tiny_cnn(num_classes=10), path)

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not be read"):
        load_checkpoint(model, tmp_path / "junk.pt")


def test_checkpoint_wrapped_in_a_training_state_loads(tmp_path):
    model = tiny_cnn(num_classes=3)
    torch.save({"model": model.state_dict(), "epoch": 4}, tmp_path / "last.pt")
    other = tiny_cnn(num_classes=3)
    load_checkpoint(other, tmp_path / "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def _bn_momenta(model: nn.Module) -> set:
    return {m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_bn_momentum_lets_running_statistics_follow_a_short_schedule():
    # torchvision builds MobileNetV3 with 0.01: too slow for a few hundred steps (eval mode at chance).
    assert _bn_momenta(torchvision.models.mobilenet_v3_small()) == {0.01}
    assert _bn_momenta(torchvision_model("mobilenet_v3_small", num_classes=10, image_size=32)) == {0.1}
    assert _bn_momenta(torchvision_model("mobilenet_v3_small", num_classes=10, bn_momentum=0.3)) == {0.3}
    assert _bn_momenta(torchvision_model("mobilenet_v3_small", num_classes=10, bn_momentum=None)) == {0.01}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_bn_momentum_default_is_what_these_archs_already_use(arch):
    # The default changes nothing for them: their own momentum is PyTorch's 0.1 too.
    assert _bn_momenta(torchvision.models.get_model(arch)) == {0.1}
    assert _bn_momenta(torchvision_model(arch, num_classes=10, image_size=32)) == {0.1}


def test_bad_bn_momentum_names_the_key():
    with pytest.raises(ConfigError, match="bn_momentum"):
        torchvision_model("mobilenet_v3_small", num_classes=10, bn_momentum=0)


def test_the_shipped_mobilenet_v3_config_sets_bn_momentum():
    cfg = compose_config(["student=mobilenet_v3_small", "dataset.limit=4"])
    model = build.build_model(cfg.student, "student", build.build_data(cfg), cfg.seed)
    assert cfg.student.model.bn_momentum == 0.1 and _bn_momenta(model) == {0.1}


@pytest.mark.parametrize(
    "arch,size", [("googlenet", 32), ("inception_v3", 75), ("vit_b_16", 32), ("efficientnet_b0", 16)]
)
@pytest.mark.slow
def test_architectures_with_constraints_build_and_run_at_the_data_sets_size(arch, size):
    torch.manual_seed(0)
    model = torchvision_model(arch, num_classes=10, image_size=size)
    assert architecture(model) == arch
    for train in (True, False):  # in train mode too: logits, not (logits, aux logits)
        model.train(train)
        out = model(torch.randn(2, 3, size, size))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


@pytest.mark.parametrize(
    "arch,size,fix",
    [
        ("inception_v3", 32, "needs images of at least 75 px; use dataset.image_size=75 or more"),
        ("vit_b_16", 40, "cuts images into 16 px patches: use a dataset.image_size that is a multiple, e.g. 32"),
    ],
)
def test_size_constraints_are_one_line_naming_the_key_and_the_fix(arch, size, fix):
    node = OmegaConf.create({"_target_": "distill_runner.models.factories.torchvision_model", "arch": arch})
    with pytest.raises(ConfigError) as err:
        instantiate(node, "teacher.model", num_classes=10, in_channels=3, image_size=size)
    assert str(err.value) == f"teacher.model.arch='{arch}': {fix}"


def test_architecture_labels_tell_models_apart():
    assert architecture(tiny_cnn(num_classes=10)) == "tiny_cnn[16,32]"
    assert architecture(tiny_cnn(num_classes=10, channels=[64, 128, 256])) == "tiny_cnn[64,128,256]"
    assert architecture(nn.Linear(2, 2)) == "Linear"  # a model of the user's own factory: its class


def _offline(monkeypatch, tmp_path) -> list:
    """No network: every torchvision download fails, and each attempt is recorded."""
    from urllib.error import URLError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tried = []

    def offline(url, *args, **kwargs):
        tried.append(url)
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    return tried


def test_a_teacher_checkpoint_is_loaded_without_fetching_imagenet_weights(tmp_path, monkeypatch):
    """xray_kd sets teacher.weights=IMAGENET1K_V1; with teacher.checkpoint the checkpoint sets every weight."""
    from types import SimpleNamespace

    tried = _offline(monkeypatch, tmp_path)
    saved = torchvision_model("resnet18", num_classes=2, image_size=32)
    torch.save(saved.state_dict(), tmp_path / "teacher.pt")
    cfg = compose_config([f"teacher.checkpoint={tmp_path / 'teacher.pt'}"], experiment="xray_kd")
    assert cfg.teacher.weights == "IMAGENET1K_V1"
    data = SimpleNamespace(num_classes=2, in_channels=3, image_size=32)
    teacher = build.build_teacher(cfg.teacher, "teacher", data, cfg.seed)
    assert tried == [] and torch.equal(teacher.fc.weight, saved.fc.weight)


def test_the_offline_fix_works_when_pasted(tmp_path, monkeypatch):
    """The override the offline message prints, added to the same command, passes validation and builds."""
    import re
    from types import SimpleNamespace

    from distill_runner.config import validate

    tried = _offline(monkeypatch, tmp_path)
    data = SimpleNamespace(num_classes=2, in_channels=3, image_size=32)
    overrides = ["teacher.weights=IMAGENET1K_V1", "teacher.epochs=1"]
    with pytest.raises(ConfigError) as err:
        build.build_teacher(compose_config(overrides).teacher, "teacher", data, 0)
    assert tried and err.value.key == "teacher.weights"
    pasted = re.findall(r"set (\S+=\S+) to train from scratch", str(err.value))
    assert pasted == ["teacher.weights=null"]
    cfg = compose_config([*overrides, *pasted])
    validate(cfg)
    assert isinstance(build.build_teacher(cfg.teacher, "teacher", data, 0), nn.Module)


def test_a_factorys_fix_names_the_full_key():
    """The tiny CNN says "set weights=null"; under a node the fix names the key to paste."""
    from types import SimpleNamespace

    data = SimpleNamespace(num_classes=2, in_channels=3, image_size=16)
    cfg = compose_config(["teacher=wide_cnn", "teacher.weights=IMAGENET1K_V1"])
    with pytest.raises(ConfigError) as err:
        build.build_teacher(cfg.teacher, "teacher", data, 0)
    assert err.value.key == "teacher.weights" and str(err.value).endswith("set teacher.weights=null")
    with pytest.raises(ConfigError, match="set student.model.weights=null$"):
        build.build_model(compose_config(["+student.model.weights=x"]).student, "student", data, 0)
