"""Every recipe with a teacher replays its teacher's outputs by default (logits, and the teacher summaries
of its feature terms), and replayed equals online per batch (loss of every term, and the gradient of the
student and the recipe's adapters), over several augmented epochs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose_config
from replay_check import replayed_equals_online

from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.distill.contract import Term
from distill_runner.distill.recipe import Recipe
from distill_runner.distill.signals import (
    Replay,
    compute_teacher_outputs,
    extra_teachers,
    online_signal,
    replay_blocker,
    teacher_weights,
)
from distill_runner.train import engine

CONF = Path(__file__).resolve().parents[3] / "conf"
# TINY with 32 training images: two batches of 16 an epoch, reshuffled and re-augmented each epoch, are what the
# replay must follow (TINY's 48 gave a third batch that checked nothing more, for half again the time)
SMALL = TINY + ["dataset.limit=32"]
CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)
ONLINE_ONLY = {"self"}  # no teacher
# relation recipes: their own replay test (tests/methods/test_relation_replay.py); FSP, KDSVD pair equal widths
RELATION = {"rkd", "pkt", "sp", "cc", "nst", "fsp", "kdsvd", "ickd"}
WIDTHS = {"fsp": ["student.model.channels=[64,128]"], "kdsvd": ["student.model.channels=[64,128]"]}
HEADS = {"sdd_kd", "sdd_dkd", "sdd_nkd", "catkd"}  # read the tiny CNN's classifier on its pooled feature: pool_size 1
WIDTHS |= {name: ["student.model.pool_size=1"] for name in HEADS}
# recipes whose teacher summaries go beyond logits
FEATURE_RECIPES = (
    {"feature", "attention", "combo", "crd", "vid", "reviewkd", "ofd", "ab", "ft", "srd", "simkd"} | RELATION | HEADS
)
# a weak and a strong view per batch: their own replay test (tests/methods/test_crld_runs.py)
TWO_VIEWS = {"crld", "mlkd_strong"}
REPLAYED = sorted(p.stem for p in (CONF / "distill").glob("*.yaml") if p.stem not in ONLINE_ONLY | RELATION | TWO_VIEWS)
# (recipe, storage dtype, relative tolerance of each term's loss and of the gradient's norm): float32 storage
# replays the online values (bit for bit on this CPU); float16 rounds each stored value (relative <= 2**-11),
# which moved attention's losses by <= 7e-5 and the gradient by <= 2e-4 of its norm here
CASES = [(n, torch.float32, 1e-5) for n in REPLAYED] + [
    (n, torch.float16, 1e-3) for n in sorted(FEATURE_RECIPES - RELATION)
]


@pytest.fixture(scope="module")
def teacher_and_data():
    cfg = compose_config(SMALL + ["dataset.crop_padding=2"])
    data = build_data(cfg)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    return data, teacher


@pytest.mark.slow
def test_only_recipes_without_a_teacher_stay_online_and_the_feature_list_is_right(teacher_and_data):
    data, _ = teacher_and_data
    for name in sorted(p.stem for p in (CONF / "distill").glob("*.yaml")):
        cfg = compose_config(SMALL + [f"distill={name}"] + WIDTHS.get(name, []))
        recipe = build_recipe(cfg, data, build_model(cfg.student, "student", data, cfg.seed))
        assert (not recipe.needs_teacher) == (name in ONLINE_ONLY), name
        assert bool(recipe.teacher_layers) == (name in FEATURE_RECIPES) == bool(recipe.summary_spec()), name


@pytest.mark.slow
@pytest.mark.parametrize("name,dtype,tolerance", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d, _ in CASES])
def test_replayed_teacher_outputs_equal_online_per_batch(name, dtype, tolerance, teacher_and_data):
    data, teacher = teacher_and_data
    cfg = compose_config(SMALL + [f"distill={name}"] + WIDTHS.get(name, []))
    assert cfg.distill.get("teacher_outputs", "cached") == "cached"  # replayed by default (the runner's default)
    torch.manual_seed(0)
    student = build_model(cfg.student, "student", data, cfg.seed)
    recipe = build_recipe(cfg, data, student, teacher)
    assert replay_blocker(data.train, Replay("cached", 3, dtype, 1e9, False), lambda: 0.0) is None
    teachers = [teacher] + [build_model(n, k, data, 1).eval() for k, n in extra_teachers(cfg.distill).items()]
    online = online_signal(teachers, teacher_weights(cfg.distill), recipe.teacher_layers)
    assert replayed_equals_online(recipe, student, online, data, dtype, tolerance) == 3 * len(data.train)


class ChannelMeanHint(Term):
    """A feature term of a user's own that keeps less of the teacher: MSE to the channel mean of a map."""

    def __init__(self, student: str, teacher: str):
        super().__init__()
        self.student_layers, self.teacher_layers = (student,), (teacher,)

    def teacher_summary(self, layer, feature):
        return feature.float().mean(1)

    def forward(self, batch, student, teacher, state):
        (s,), (t,) = self.student_layers, self.teacher_layers
        y = teacher["features"][t]
        x = F.interpolate(student["features"][s].float().mean(1, keepdim=True), size=y.shape[-2:], mode="bilinear")
        return F.mse_loss(x[:, 0], y)


def test_a_feature_term_of_the_users_own_is_replayed_as_it_summarizes(teacher_and_data):
    data, teacher = teacher_and_data
    torch.manual_seed(0)
    student = build_model(compose_config(SMALL).student, "student", data, 0)
    target = f"{__name__}.ChannelMeanHint"
    recipe = Recipe({"mine": {"_target_": target, "student": "features.1", "teacher": "layer3", "weight": 2.0}})
    recipe.bind(student, teacher, data)
    spec = {
        "mine": {"layers": ["layer3"], "summary": {"_target_": target, "student": "features.1", "teacher": "layer3"}}
    }
    assert recipe.summary_spec() == spec  # what its reduction depends on enters the cache key (not its weight)
    assert replayed_equals_online(
        recipe, student, online_signal([teacher], None, ("layer3",)), data, torch.float32, 1e-5
    )
    entry = compute_teacher_outputs(online_signal([teacher], None, ("layer3",)), data.train, 1, CPU, FP32,
                                    torch.float16, False, recipe.summarize)  # fmt: skip
    assert entry["summaries"]["mine"]["layer3"].shape == (1, data.train.num_samples, 4, 4)  # [B, H, W]: no channels
