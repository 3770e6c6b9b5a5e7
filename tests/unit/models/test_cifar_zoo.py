"""The CIFAR-100 zoo: every model builds from its config under the published name, with the reference code's
parameter count and state_dict keys and shapes (tests/reference/cifar_zoo.json, from RepDistiller's models/)."""

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from distill_runner.errors import ConfigError, instantiate
from distill_runner.models.cifar.mobilenetv2 import mobilenet_v2
from distill_runner.models.cifar.resnet import cifar_resnet
from distill_runner.models.cifar.vgg import vgg_bn
from distill_runner.models.cifar.wrn import wide_resnet
from distill_runner.models.features import feature_shapes

REFERENCE = json.loads((Path(__file__).resolve().parents[3] / "tests" / "reference" / "cifar_zoo.json").read_text())
ZOO = list(REFERENCE["models"])
CONF = Path(__file__).resolve().parents[3] / "conf"
# The names the issue lists, as RepDistiller's model_dict spells them.
PUBLISHED_NAMES = [
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "ResNet50",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "MobileNetV2",
    "ShuffleV1",
    "ShuffleV2",
]
# Stage outputs the README documents for feature recipes: module path -> spatial size at 32 px input.
STAGE_OUTPUTS = {
    "resnet8x4": {"relu": 32, "layer1": 32, "layer2": 16, "layer3": 8},
    "ResNet50": {"relu": 32, "layer1": 32, "layer2": 16, "layer3": 8, "layer4": 4},
    "wrn_16_2": {"conv1": 32, "block1": 32, "block2": 16, "block3": 8, "relu": 8},
    "vgg8": {"relu0": 32, "relu1": 16, "relu2": 8, "relu3": 4, "relu4": 4, "block4": 4},
    "MobileNetV2": {"conv1": 16, "blocks.1": 16, "blocks.2": 8, "blocks.4": 4, "blocks.6": 2, "conv2": 2},
    "ShuffleV1": {"relu": 32, "layer1": 16, "layer2": 8, "layer3": 4},
    "ShuffleV2": {"relu": 32, "layer1": 16, "layer2": 8, "layer3": 4, "conv2": 4},
}


def key_shape_lines(model: torch.nn.Module) -> list[str]:
    return sorted(f"{k}:{','.join(map(str, v.shape))}" for k, v in model.state_dict().items())


def deterministic_state(model: torch.nn.Module) -> dict:
    """Weights as a fixed function of (sorted key index, element index), as described in the reference's
    "forward" section: the same numbers in any code base, no RNG."""
    state = {}
    for i, (key, value) in enumerate(sorted(model.state_dict().items())):
        wave = torch.sin(torch.arange(value.numel(), dtype=torch.float64) * 0.61 + i).reshape(value.shape)
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = (1 + 0.5 * wave.abs()).float()
        elif key.endswith(("running_mean", "bias")):
            state[key] = (0.1 * wave).float()
        elif value.dim() == 1:  # BatchNorm weight
            state[key] = (1 + 0.1 * wave).float()
        else:
            state[key] = (wave * math.sqrt(2.0 / (value.numel() // value.shape[0]))).float()
    return state


def build(name: str, group: str = "student", num_classes: int = 100) -> torch.nn.Module:
    node = compose_config([f"{group}=cifar_{name}"])[group].model
    return instantiate(node, f"{group}.model", num_classes=num_classes, in_channels=3, image_size=32)


def test_the_zoo_has_every_published_name_in_both_groups():
    assert sorted(ZOO) == sorted(PUBLISHED_NAMES)
    for name in PUBLISHED_NAMES:
        teacher = OmegaConf.load(CONF / "teacher" / f"cifar_{name}.yaml")
        student = OmegaConf.load(CONF / "student" / f"cifar_{name}.yaml")
        assert teacher.model == student.model and teacher.name == student.name == name
        assert teacher.benchmark_lr == student.benchmark_lr == (0.01 if name[0] in "MS" else 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_parameters_and_state_dict_keys_equal_the_reference(name):
    model = build(name)
    expected = REFERENCE["models"][name]
    lines = key_shape_lines(model)
    stored = REFERENCE["key_shapes"].get(name)
    if stored is not None and lines != stored:  # the readable failure: the first keys that differ
        missing, extra = sorted(set(stored) - set(lines)), sorted(set(lines) - set(stored))
        pytest.fail(f"{name}: reference has {missing[:3]} that ours lacks; ours has {extra[:3]} that it lacks")
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]
    assert len(lines) == expected["state_dict_entries"]
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == expected["sha256"], (
        f"{name}: same count, other keys or shapes; first lines: {lines[:3]}"
    )
    assert model.architecture == name


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_logits_equal_the_reference_code_with_the_same_weights(name):
    """Same keys are not enough for a published checkpoint to work: the forward pass must be the reference's."""
    model = build(name)
    model.load_state_dict(deterministic_state(model))
    model.eval()
    images = torch.cos(torch.arange(2 * 3 * 32 * 32, dtype=torch.float64) * 0.013).reshape(2, 3, 32, 32).float()
    with torch.no_grad():
        logits = model(images).double()
    expected = REFERENCE["forward"]["models"][name]
    torch.testing.assert_close(logits[:, :5], torch.tensor(expected["logits_first5"], dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(logits.sum(1), torch.tensor(expected["logits_sum"], dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE["key_shapes"]))
def test_a_state_dict_with_the_reference_keys_loads_strictly(name):
    """What loading a published checkpoint needs: every key of the reference model, with its shape."""
    state = {}
    for line in REFERENCE["key_shapes"][name]:
        key, shape = line.split(":")
        size = [int(s) for s in shape.split(",") if s]
        state[key] = torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(size)
    model = build(name, group="teacher")
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.state_dict()[next(iter(state))], next(iter(state.values())))


@pytest.mark.parametrize("name", sorted(STAGE_OUTPUTS))
def test_documented_stage_outputs_exist_with_their_sizes(name):
    shapes = feature_shapes(build(name), list(STAGE_OUTPUTS[name]), in_channels=3, image_size=32)
    assert {k: s[-1] for k, s in shapes.items()} == STAGE_OUTPUTS[name]


def test_published_parameter_counts():
    """The counts the papers print (millions, two decimals) for the common teachers and students."""
    published = {"resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "wrn_16_2": 0.70, "resnet56": 0.86,
                 "resnet20": 0.28}  # fmt: skip
    for name, millions in published.items():
        assert round(REFERENCE["models"][name]["parameters"] / 1e6, 2) == millions


@pytest.mark.parametrize(
    ("factory", "kwargs", "key"),
    [
        (cifar_resnet, {"depth": 9, "widths": [16, 16, 32, 64]}, "depth"),
        (cifar_resnet, {"depth": 8, "widths": [16, 32]}, "widths"),
        (wide_resnet, {"depth": 41, "widen_factor": 2}, "depth"),
        (vgg_bn, {"stages": [[64], [128]]}, "stages"),
        (mobilenet_v2, {"width_mult": 0.0}, "width_mult"),
        (cifar_resnet, {"depth": 8, "widths": [16, 16, 32, 64], "weights": "IMAGENET1K_V1"}, "weights"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_key(factory, kwargs, key):
    with pytest.raises(ConfigError) as err:
        factory(num_classes=10, **kwargs)
    assert err.value.key == key and "\n" not in str(err.value)


def test_a_zoo_model_takes_grayscale_and_other_class_counts():
    model = build("resnet8", num_classes=10)
    assert model.fc.out_features == 10
    gray = cifar_resnet(num_classes=2, depth=8, widths=[16, 16, 32, 64], in_channels=1)
    assert gray(torch.zeros(1, 1, 32, 32)).shape == (1, 2)


def look_alike(options: list[str]) -> list[tuple[str, str]]:
    """Pairs of options a reader takes for one model: MobileNetV2, mobilenet_v2 and mobilenet-v2 differ only in
    case and punctuation."""
    seen: dict[str, str] = {}
    pairs = []
    for option in sorted(options):
        key = re.sub(r"[^a-z0-9]", "", option.lower())
        if key in seen:
            pairs.append((seen[key], option))
        seen.setdefault(key, option)
    return pairs


@pytest.mark.parametrize("group", ["student", "teacher"])
def test_no_two_model_options_differ_only_in_case_or_punctuation(group):
    assert look_alike(["MobileNetV2", "mobilenet_v2", "tiny_cnn"]) == [("MobileNetV2", "mobilenet_v2")]
    assert look_alike([p.stem for p in (CONF / group).glob("*.yaml")]) == []


@pytest.mark.parametrize("group", ["student", "teacher"])
def test_zoo_options_are_the_published_names_behind_the_cifar_prefix(group):
    zoo = sorted(p.stem for p in (CONF / group).glob("*.yaml") if "models.cifar." in p.read_text())
    assert zoo == sorted(f"cifar_{name}" for name in PUBLISHED_NAMES)
    assert sorted(p.stem for p in (CONF / group).glob("cifar_*.yaml")) == zoo  # cifar_ is the zoo's alone
