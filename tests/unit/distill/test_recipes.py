"""Loss recipes: each term against an independent computation, schedules, layer names, configs."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose_config, quickstart_overrides
from hydra.utils import get_class
from omegaconf import OmegaConf

from distill_runner import runner
from distill_runner.build import build_data, build_teacher
from distill_runner.data.digits import digits
from distill_runner.distill.recipe import Recipe
from distill_runner.distill.schedules import Schedule, parse_schedule
from distill_runner.distill.terms.features import at_loss
from distill_runner.distill.terms.logits import dkd_per_sample, kd_per_sample
from distill_runner.distill.weighting import class_balance_weights, teacher_confidence_weights
from distill_runner.errors import ConfigError
from distill_runner.models.factories import tiny_cnn, torchvision_model
from distill_runner.models.features import FeatureTap

CONF = Path(__file__).resolve().parents[3] / "conf"
TERM = {
    name: f"distill_runner.distill.terms.{cls}"
    for name, cls in [("ce", "CrossEntropy"), ("kd", "HintonKD"), ("dkd", "DecoupledKD"), ("feature", "FeatureHints"),
                      ("attention", "AttentionTransfer"), ("self", "SelfDistillation")]
}  # fmt: skip
RECIPES = sorted(p.stem for p in (CONF / "distill").glob("*.yaml"))


def _logits(seed=0, n=32, c=10, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, generator=gen) * scale,
        torch.randn(n, c, generator=gen) * scale,
        torch.randint(0, c, (n,), generator=gen),
    )


def _np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------- references


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """A transcription of mdistiller/distillers/DKD.py dkd_loss (megvii-research/mdistiller)."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    cat = lambda t: torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], 1)
    pred_student = cat(F.softmax(logits_student / temperature, dim=1))
    pred_teacher = cat(F.softmax(logits_teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def authors_at_loss(x, y):
    """szagoruyko/attention-transfer utils.py: at(x) = F.normalize(x.pow(2).mean(1).view(x.size(0), -1))."""
    at = lambda x: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))
    return (at(x) - at(y)).pow(2).mean()


# --------------------------------------------------------------------------- loss terms


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_term_matches_numpy_and_the_classic_recipe(temperature):
    s, t, y = _logits()
    ps, pt = _np_softmax(s.double().numpy() / temperature), _np_softmax(t.double().numpy() / temperature)
    expected = temperature**2 * (pt * (np.log(pt) - np.log(ps))).sum(1)
    assert kd_per_sample(s, t, temperature).numpy() == pytest.approx(expected, rel=1e-4)
    recipe = Recipe(
        {"ce": {"_target_": TERM["ce"], "weight": "1-alpha"}, "kd": {"_target_": TERM["kd"], "weight": "alpha"}},
        temperature=temperature,
        alpha=0.3,
    )
    ours, classic = (
        recipe({"target": y}, {"logits": s}, {"logits": t}),
        Recipe.hinton(temperature, 0.3)({"target": y}, {"logits": s}, {"logits": t}),
    )
    assert set(ours) == {"ce", "kd"} and all(ours[k].item() == pytest.approx(classic[k].item(), rel=1e-5) for k in ours)


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 0.5, 1.0), (2.0, 1.0, 2.0)])
def test_dkd_matches_mdistiller(alpha, beta, temperature):
    s, t, y = _logits(1)
    ours = dkd_per_sample(s, t, y, alpha, beta, temperature).mean()
    assert ours.item() == pytest.approx(mdistiller_dkd(s, t, y, alpha, beta, temperature).item(), rel=1e-4)
    # TCKD + NCKD with alpha = beta = 1 is not KD in general, but equals it when the teacher's and
    # student's target probabilities agree; and both vanish when student == teacher
    assert dkd_per_sample(t, t, y, alpha, beta, temperature).abs().max().item() < 1e-5


def test_attention_transfer_matches_the_authors():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 16, 8, 8, generator=gen), torch.randn(4, 64, 8, 8, generator=gen)
    assert at_loss(x, y).item() == pytest.approx(authors_at_loss(x, y).item(), rel=1e-6)
    # independent: per sample q = mean_c x^2, q / ||q||_2
    q = lambda f: (f.double() ** 2).mean(1).flatten(1)
    qx, qy = q(x), q(y)
    expected = ((qx / qx.norm(dim=1, keepdim=True) - qy / qy.norm(dim=1, keepdim=True)) ** 2).mean()
    assert at_loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def _data(**kw):
    return digits(image_size=16, batch_size=8, limit=32, **kw)


def test_feature_hint_with_adapter_and_resize_matches_a_manual_computation():
    data = _data()
    student = tiny_cnn(10, channels=[4, 8], hidden=8)
    teacher = torchvision_model("resnet18", 10, image_size=16)
    recipe = Recipe(
        {
            "feature": {
                "_target_": TERM["feature"],
                "pairs": [{"student": "features.0", "teacher": "layer3", "weight": 3.0}, "features.1:layer2"],
            }
        }
    )
    recipe.bind(student, teacher, data)
    assert recipe.student_layers == ("features.0", "features.1") and recipe.teacher_layers == ("layer3", "layer2")
    gen = torch.Generator().manual_seed(3)
    s0, s1 = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 8, 4, 4, generator=gen)
    t3, t2 = torch.randn(2, 256, 4, 4, generator=gen), torch.randn(2, 128, 8, 8, generator=gen)
    out = recipe(
        {"target": torch.zeros(2, dtype=torch.long)},
        {"features": {"features.0": s0, "features.1": s1}},
        {"features": {"layer3": t3, "layer2": t2}},
    )

    def adapt(x, adapter):  # 1x1 conv, then BatchNorm with batch statistics (training mode)
        conv, bn = adapter[0], adapter[1]
        z = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0].double(), x.double())
        mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + bn.eps) * bn.weight.double()[:, None, None] + bn.bias.double()[
            :, None, None
        ]

    a0 = F.interpolate(
        adapt(s0, recipe.terms["feature"].adapters["0"]), size=(4, 4), mode="bilinear", align_corners=False
    )  # 8x8 -> 4x4
    a1 = F.interpolate(
        adapt(s1, recipe.terms["feature"].adapters["1"]), size=(8, 8), mode="bilinear", align_corners=False
    )  # 4x4 -> 8x8
    expected = (3.0 * ((a0 - t3.double()) ** 2).mean() + 1.0 * ((a1 - t2.double()) ** 2).mean()) / 4.0
    assert out["feature"].item() == pytest.approx(expected.item(), rel=1e-4)
    # adapters are recipe parameters: trained with the student, not in its state_dict
    assert sum(p.numel() for p in recipe.parameters()) == (4 * 256 + 2 * 256) + (8 * 128 + 2 * 128)
    assert not any("adapter" in k for k in student.state_dict())


def test_no_adapter_when_channels_match():
    data = _data()
    student, teacher = tiny_cnn(10, channels=[64, 128], hidden=8), torchvision_model("resnet18", 10, image_size=16)
    recipe = Recipe({"feature": {"_target_": TERM["feature"], "pairs": ["features.0:layer1"]}})
    recipe.bind(student, teacher, data)
    assert len(recipe.terms["feature"].adapters) == 0


@pytest.mark.parametrize("method", ["inverse_frequency", "effective_number"])
def test_class_balanced_weights_and_weighted_kd(method):
    counts = [500, 100, 10, 0]
    beta = 0.99
    raw = (
        np.array([1 / 500, 1 / 100, 1 / 10])
        if method == "inverse_frequency"
        else np.array([(1 - beta) / (1 - beta**n) for n in counts[:3]])
    )
    expected = np.append(raw / raw.sum() * 3, 0.0)
    w = class_balance_weights(counts, method, beta)
    assert w.numpy() == pytest.approx(expected, rel=1e-5) and w.sum().item() == pytest.approx(3.0)
    # the recipe weights each sample's KD term by its class weight
    s, t, y = _logits(4, n=16, c=4)
    data = _data()
    data.class_counts["train"] = counts
    recipe = Recipe(
        {"kd": {"_target_": TERM["kd"], "weight": 1.0}}, temperature=2.0, class_balance=method, class_balance_beta=beta
    )
    recipe.bind(None, None, data)
    got = recipe({"target": y}, {"logits": s}, {"logits": t})["kd"]
    assert got.item() == pytest.approx(
        (kd_per_sample(s, t, 2.0) * torch.as_tensor(expected, dtype=torch.float32)[y]).mean().item(), rel=1e-5
    )


def test_teacher_confidence_weighting():
    s, t, y = _logits(5)
    conf = F.softmax(t, 1)[torch.arange(len(y)), y]
    w = teacher_confidence_weights(t, y)
    assert w.numpy() == pytest.approx((conf / conf.mean()).numpy(), rel=1e-5) and w.mean().item() == pytest.approx(1.0)
    recipe = Recipe({"kd": {"_target_": TERM["kd"]}}, temperature=4.0, sample_weighting="teacher_confidence")
    got = recipe({"target": y}, {"logits": s}, {"logits": t})["kd"]
    assert got.item() == pytest.approx((kd_per_sample(s, t, 4.0) * w).mean().item(), rel=1e-5)


def test_self_distillation_heads_learn_from_the_final_logits():
    data = _data()
    student = tiny_cnn(10, channels=[4, 8], hidden=8)
    recipe = Recipe(
        {
            "ce": {"_target_": TERM["ce"]},
            "self": {"_target_": TERM["self"], "heads": ["features.0"], "deepest": "features.1", "hint_weight": 0.5},
        },
        temperature=3.0,
        alpha=0.5,
    )
    recipe.bind(student, None, data)
    assert not recipe.needs_teacher and recipe.student_layers == ("features.0", "features.1")
    tap = FeatureTap(student, recipe.student_layers)
    batch = next(iter(data.train))
    out = recipe(batch, tap(batch["image"]), None)
    head = recipe.terms["self"].heads["0"]
    z, logits = head(tap(batch["image"])["features"]["features.0"])
    final = tap(batch["image"])
    expected = (
        0.5 * F.cross_entropy(logits, batch["target"])
        + 0.5 * kd_per_sample(logits, final["logits"], 3.0).mean()
        + 0.5 * F.mse_loss(z, final["features"]["features.1"].mean((2, 3)))
    )
    assert out["self"].item() == pytest.approx(expected.item(), rel=1e-4)
    out["self"].backward()
    assert (
        head.fc.weight.grad is not None and student.classifier[-1].weight.grad is None
    )  # final logits are the (detached) teacher
    tap.remove()


# --------------------------------------------------------------------------- schedules


def test_schedules_give_the_documented_values():
    assert [Schedule("linear", 0.0, 0.5).value(0.5, e, 10) for e in range(10)] == pytest.approx(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    )
    assert [Schedule("constant").value(0.7, e, 10) for e in (0, 9)] == [0.7, 0.7]
    cos = [Schedule("cosine", 8.0, 1.0).value(4.0, e, 4) for e in range(4)]
    assert cos == pytest.approx([8 - 4 * (1 - math.cos(math.pi * p)) / 2 for p in (0.25, 0.5, 0.75, 1.0)])
    assert cos[1] == pytest.approx(6.0) and cos[-1] == pytest.approx(4.0)
    # mdistiller's DKD warm-up min(epoch / 20, 1), 1-based epochs, over 240 epochs
    warm = Schedule("linear", 0.0, 20 / 240)
    assert [warm.value(1.0, e, 240) for e in (0, 9, 19, 100)] == pytest.approx([1 / 20, 10 / 20, 1.0, 1.0])
    assert parse_schedule("linear", "s") == Schedule("linear", 0.0, 1.0)
    with pytest.raises(ConfigError, match="ramp"):
        parse_schedule({"kind": "linear", "ramp": 2}, "schedule.alpha")


def test_recipe_schedules_alpha_temperature_and_term_weights():
    recipe = Recipe(
        {
            "ce": {"_target_": TERM["ce"], "weight": "1-alpha"},
            "kd": {"_target_": TERM["kd"], "weight": "alpha"},
            "attention": {"_target_": TERM["attention"], "weight": 1000.0, "pairs": ["a:b"]},
        },
        temperature=4.0,
        alpha=0.5,
        schedule={
            "alpha": {"kind": "linear", "ramp": 0.5},
            "temperature": {"kind": "cosine", "start": 8.0},
            "attention": "linear",
        },
    )
    first, last = recipe.set_epoch(0, 10), recipe.set_epoch(9, 10)
    assert (
        first["alpha"] == pytest.approx(0.1)
        and first["weight/ce"] == pytest.approx(0.9)
        and first["weight/kd"] == pytest.approx(0.1)
    )
    assert first["weight/attention"] == pytest.approx(100.0) and last["weight/attention"] == pytest.approx(1000.0)
    assert first["temperature"] == pytest.approx(8 - 4 * (1 - math.cos(math.pi * 0.1)) / 2) and last[
        "temperature"
    ] == pytest.approx(4.0)
    assert last["alpha"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"terms": {"kd": {"_target_": TERM["kd"]}}, "temperature": 0}, "temperature"),
        ({"terms": {"kd": {"_target_": TERM["kd"], "weight": "alpha"}}, "alpha": 1.5}, "alpha"),
        ({"terms": {"kdd": {}}}, "terms.kdd._target_"),
        ({"terms": {"kd": {"_target_": TERM["kd"], "weight": "2*alpha"}}}, "terms.kd.weight"),
        ({"terms": {"kd": {"_target_": TERM["kd"]}}, "schedule": {"gamma": "linear"}}, "schedule.gamma"),
        (
            {"terms": {"kd": {"_target_": TERM["kd"]}}, "schedule": {"temperature": "linear"}},
            "schedule.temperature.start",
        ),
        ({"terms": {"kd": {"_target_": TERM["kd"]}}, "class_balance": "sqrt"}, "class_balance"),
        ({"terms": {"kd": {"_target_": TERM["kd"]}}, "sample_weighting": "loss"}, "sample_weighting"),
    ],
)
def test_bad_recipe_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        Recipe(**kwargs)
    assert err.value.key == key


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A saved, untrained tiny-size teacher: runs use it as loaded (teacher.epochs=0), so no test fine-tunes "
    "ResNet-18."""
    cfg = compose_config(TINY)
    data = build_data(cfg)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_teacher(cfg.teacher, "teacher", data, cfg.seed).state_dict(), path)
    return path


def _fast(teacher_path):
    return TINY + ["dataset.eval_batch_size=16", "teacher.epochs=0", f"teacher.checkpoint={teacher_path}"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for every recipe's run, as a sweep over recipes shares it: the baseline, the teacher's
    evaluation and speed, and the logits-only teacher outputs do not depend on the recipe, so they are computed
    by the first run and reused by the others (each recipe's own student stage still trains)."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_one_epoch_end_to_end(recipe, random_teacher, shared_cache, tmp_path):
    extra = ["distill.teachers.cnn.epochs=1"] if recipe == "multi_teacher" else []
    extra += quickstart_overrides(recipe)  # e.g. FSP's pairs of equal widths, SDD's classifier on the pooled map
    extra += [f"cache.dir={shared_cache}"]
    metrics = runner.run(compose_config(_fast(random_teacher) + [f"distill={recipe}"] + extra), tmp_path)
    history = metrics.stages["student"].history
    assert (
        len(history) == 1 and math.isfinite(history[0]["loss/total"]) and 0 <= metrics.models["student"].test_acc <= 1
    )
    # logged per epoch: the term weights, and the temperature where a term reads it (kd included now)
    assert any(k.startswith("schedule/weight/") for k in history[0])
    reads_temperature = any(
        "temperature" in get_class(term["_target_"]).hyperparameters
        for term in OmegaConf.load(CONF / "distill" / f"{recipe}.yaml").terms.values()
    )
    assert reads_temperature == ("schedule/temperature" in history[0])
    if reads_temperature:
        assert history[0]["schedule/temperature"] > 0
    if recipe == "ctkd":  # the learned temperature, logged per epoch; official range (1, 21)
        assert 1 < history[0]["learned/kd/temperature"] < 21
    if recipe in ("feature", "self", "combo"):
        assert metrics.stages["student"].recipe_params > 0
        # the shipped student is the plain student: same keys as the baseline
        assert (
            torch.load(tmp_path / "checkpoints" / "student.pt").keys()
            == torch.load(tmp_path / "checkpoints" / "baseline.pt").keys()
        )
    if recipe == "multi_teacher":
        assert "distill.teachers.cnn" in metrics.stages


def test_bad_layer_name_fails_at_start_up_with_the_valid_names(random_teacher, tmp_path):
    cfg = compose_config(_fast(random_teacher) + ["distill=feature", "distill.terms.feature.pairs.1.teacher=layer9"])
    with pytest.raises(ConfigError) as err:
        runner.run(cfg, tmp_path)
    assert err.value.key == "distill.terms.feature.pairs.1.teacher" and err.value.value == "layer9"
    assert "valid names: conv1, bn1, relu, maxpool, layer1, layer1.0" in str(err.value) and "layer4" in str(err.value)
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained
    cfg = compose_config(_fast(random_teacher) + ["distill=self", "distill.terms.self.heads=[features.7]"])
    with pytest.raises(
        ConfigError,
        match=r"distill.terms.self.heads.0='features.7': no such layer in the student \(TinyCNN\); "
        r"valid names: features, features.0, features.1, pool, classifier",
    ):
        runner.run(cfg, tmp_path)


def test_dkd_alpha_above_one_and_teacher_weights(random_teacher, tmp_path):
    cfg = compose_config(_fast(random_teacher) + ["distill=dkd", "distill.alpha=2.0"])
    runner.validate(cfg)  # alpha is DKD's target-class weight here, not the KD/CE mix
    cfg = compose_config(_fast(random_teacher) + ["distill=multi_teacher", "distill.teacher_weights={teacher: 1.0}"])
    with pytest.raises(ConfigError, match=r"distill.teacher_weights=.*teacher: 1.0, cnn: 1.0"):
        runner.run(cfg, tmp_path)
