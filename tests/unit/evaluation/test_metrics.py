"""Each evaluation metric on hand-made inputs with known answers."""

import math

import numpy as np
import pytest
import torch
from conftest import compose_config
from torch import nn

from distill_runner.config import validate
from distill_runner.distill.recipe import Recipe
from distill_runner.errors import ConfigError
from distill_runner.evaluation import metrics as M
from distill_runner.models.factories import tiny_cnn
from distill_runner.train import engine

CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)


def logits_from_probs(p):
    return torch.tensor(p, dtype=torch.float64).log()


# ------------------------------------------------------------------ classification report


def test_per_class_precision_recall_f1_and_confusion_by_hand():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = nn.functional.one_hot(preds, 4).float() * 5  # class 3 is neither a label nor a prediction
    r = M.classification_report(logits, targets, num_classes=4)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]  # rows: true, columns: predicted
    pc = r["per_class"]
    assert pc["precision"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert pc["recall"] == pytest.approx([2 / 3, 0.5, 1.0, 0.0])
    assert pc["f1"] == pytest.approx([0.8, 0.5, 2 / 3, 0.0])
    assert pc["support"] == [3, 2, 1, 0]
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # over the classes that occur
    assert r["roc_auc"] is None  # only for two-class data sets


def test_binary_roc_auc_by_hand():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of the 4 (pos, neg) pairs are ordered right
    p1 = [0.1, 0.4, 0.35, 0.8]
    logits = logits_from_probs([[1 - p, p] for p in p1])
    r = M.classification_report(logits, torch.tensor([0, 0, 1, 1]), num_classes=2)
    assert r["roc_auc"] == pytest.approx(0.75)
    assert M.classification_report(logits, torch.tensor([1, 1, 1, 1]), num_classes=2)["roc_auc"] is None


def test_ece_by_hand():
    # confidences 0.9, 0.9 (bin 13: accuracy 1/2), 0.62 (bin 9, right), 0.7 (bin 10, right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.62, 0.38], [0.3, 0.7]])
    targets = np.array([0, 1, 0, 1])
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.62) + 1 / 4 * abs(1 - 0.7)
    assert M.expected_calibration_error(probs, targets) == pytest.approx(expected)  # 0.37
    # bins are equal-width (k/15, (k+1)/15]: 0.445 and 0.465 share bin 6, so their errors average out
    two = np.array([[0.445, 0.2775, 0.2775], [0.465, 0.2675, 0.2675]])
    assert M.expected_calibration_error(two, np.array([0, 1])) == pytest.approx(abs(0.5 - 0.455))
    # with 40 bins they fall in bins 17 and 18
    assert M.expected_calibration_error(two, np.array([0, 1]), bins=40) == pytest.approx(
        0.5 * (1 - 0.445) + 0.5 * 0.465
    )
    # confident and right: calibrated
    assert M.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


# ------------------------------------------------------------------ CKA


def reference_cka(x, y):
    """HSIC form with the centring matrix H (Kornblith et al. 2019, eq. 1-2), in numpy."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    gram_x, gram_y = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)
    return hsic(gram_x, gram_y) / math.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))


@pytest.mark.parametrize("features", [8, 64])  # fewer and more features than the 40 examples (both code paths)
def test_cka_identity_invariances_and_reference(features):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, features, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 12, generator=gen, dtype=torch.float64) + x[:, :4].repeat(1, 3) * 0.5
    assert M.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(features, features, generator=gen, dtype=torch.float64))
    assert M.linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)  # orthogonal transform
    assert M.linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    value = M.linear_cka(x, y)
    assert 0 < value < 1
    assert value == pytest.approx(reference_cka(x.numpy(), y.numpy()), rel=1e-9)
    assert M.linear_cka(x @ q * 0.01, y) == pytest.approx(value, rel=1e-9)
    assert M.linear_cka(x + 5.0, y) == pytest.approx(value, rel=1e-9)  # features are centred
    assert (
        M.linear_cka(x * torch.linspace(0.1, 10, features, dtype=torch.float64), x) < 0.99
    )  # not invariant to anisotropic scaling
    assert M.linear_cka(x.float().reshape(40, -1, 2), y) == pytest.approx(value, rel=1e-5)  # any shape, flattened


def test_cka_needs_the_same_examples():
    with pytest.raises(ValueError, match="same examples"):
        M.linear_cka(torch.zeros(4, 2), torch.zeros(5, 2))


# ------------------------------------------------------------------ FLOPs, features, timing


def test_flops_of_a_small_network_match_the_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 7))
    conv_macs = (4 * 5 * 5) * (3 * 3 * 3)  # output values x (input channels x kernel)
    linear_macs = 100 * 7
    assert M.flops_per_image(net, (3, 5, 5), CPU) == 2 * (conv_macs + linear_macs)  # FlopCounterMode counts 2 per MAC
    # the tiny CNN at 16 px: two conv blocks and the MLP head
    cnn = tiny_cnn(num_classes=10)
    macs = 16 * 16 * 16 * 3 * 9 + 8 * 8 * 32 * 16 * 9 + 512 * 192 + 192 * 10
    assert M.flops_per_image(cnn, (3, 16, 16), CPU) == 2 * macs


def test_capture_takes_the_input_of_the_last_linear_and_named_layers():
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=3, hidden=24).eval()
    x = torch.randn(10, 3, 16, 16)
    with M.capture(model, ["features.0"], max_samples=7) as found, torch.inference_mode():
        model(x[:4])
        model(x[4:])
    assert M.last_linear(model)[0] == "classifier.4"
    with torch.inference_mode():
        expected = model.classifier[:-1](model.pool(model.features(x)))
        block = model.features[0](x)
    assert torch.allclose(torch.cat(found["penultimate"]), expected[:7])
    assert torch.allclose(torch.cat(found["features.0"]), block[:7].flatten(1))
    assert not model.classifier[-1]._forward_pre_hooks and not model.features[0]._forward_hooks  # hooks removed


def test_feature_layers_of_a_recipe():
    class Feature:
        teacher_layers = ("layer3", "layer4")
        student_layers = ("features.0", "features.1")

    assert M.feature_layers(Feature()) == [("layer3", "features.0"), ("layer4", "features.1")]
    assert M.feature_layers(Recipe.hinton()) == []


def test_latency_and_throughput_stop_at_the_budget():
    model = tiny_cnn(num_classes=2, channels=(4,), hidden=8)
    found = M.latency(model, (3, 8, 8), CPU, FP32, warmup=1, min_repeats=4, budget_s=0.0)
    assert found.seconds > 0 and found.repeats == 4 * M.LATENCY_ROUNDS and len(found.rounds) == M.LATENCY_ROUNDS
    found = M.latency(model, (3, 8, 8), CPU, FP32, warmup=0, min_repeats=1, max_repeats=10, budget_s=60.0)
    assert found.repeats == 10  # max_repeats in all, shared by the rounds
    assert M.throughput(model, 8, (3, 8, 8), CPU, FP32, min_repeats=2, budget_s=0.0) > 0


def test_saved_size_is_the_torch_save_size(tmp_path):
    model = tiny_cnn(num_classes=2)
    torch.save(model.state_dict(), tmp_path / "student.pt")
    # the zip archive inside names its folder after the file, so only the name's bytes may differ
    assert abs(M.saved_size_bytes(model) - (tmp_path / "student.pt").stat().st_size) < 1000


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "override,key",
    [
        ("export=tflite", "export"),
        ("eval.latency_budget_s=0", "eval.latency_budget_s"),
        ("eval.cka_samples=1", "eval.cka_samples"),
    ],
)
def test_bad_eval_and_export_keys_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_config([override]))
    assert err.value.key == key and "\n" not in str(err.value)
    validate(compose_config(["export=onnx", "eval.latency_budget_s=0.1"]))
