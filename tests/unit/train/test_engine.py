import itertools
import logging
from dataclasses import replace
from functools import partial

import pytest
import torch
from conftest import compose_config

from distill_runner.config import validate
from distill_runner.data.bundle import Augment, stratified_split
from distill_runner.data.digits import digits
from distill_runner.distill.contract import Term
from distill_runner.distill.recipe import Recipe
from distill_runner.errors import ConfigError
from distill_runner.io import storage
from distill_runner.models.factories import tiny_cnn
from distill_runner.train import engine

CPU = torch.device("cpu")


def test_fp16_on_cpu_is_a_clear_error_or_a_logged_fallback(caplog):
    with pytest.raises(ConfigError, match="trainer.precision"):
        engine.resolve_precision("16-mixed", CPU, "cpu")
    with caplog.at_level(logging.WARNING):
        p = engine.resolve_precision("16-mixed", CPU, "auto")
    assert p.name == "32" and "falling back" in caplog.text
    assert engine.resolve_precision("bf16-mixed", CPU).dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="^trainer.precision=64: use one of 32, 16-mixed, bf16-mixed$"):
        validate(compose_config(["trainer.precision=64"]))  # the value's check: the schema's, before any work


def test_cuda_requested_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="trainer.device"):
        engine.resolve_device("cuda")
    assert engine.resolve_device("auto").type == "cpu"


def _stage(data, recipe=None, epochs=1):
    torch.manual_seed(0)
    model = tiny_cnn(num_classes=data.num_classes, hidden=16)
    return engine.Stage(
        "test",
        model,
        recipe or Recipe.cross_entropy(),
        epochs,
        partial(torch.optim.SGD, lr=0.05),
        partial(engine.warmup_cosine),
    )


@pytest.fixture(scope="module")
def small_digits():
    return digits(image_size=16, batch_size=32, limit=128)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_fit_learns_and_logs_every_epoch(small_digits, precision, tmp_path):
    stage = _stage(small_digits, epochs=3)
    history = engine.fit(
        stage,
        small_digits.train,
        small_digits.val,
        CPU,
        engine.resolve_precision(precision, CPU),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert len(history) == 3
    assert history[-1]["loss/ce"] < history[0]["loss/ce"]
    assert set(history[0]) >= {"loss/ce", "loss/total", "lr", "val/acc"}
    state = torch.load(tmp_path / "test_last.pt", weights_only=True)
    assert state["epoch"] == 3 and {"model", "optimizer", "scheduler", "scaler"} <= set(state)
    best = torch.load(tmp_path / "test_best.pt", weights_only=True)
    assert best["val_acc"] == max(h["val/acc"] for h in history) and 1 <= best["epoch"] <= 3


def test_non_finite_loss_stops_with_stage_epoch_batch_and_terms(small_digits):
    class NaNLoss(Term):
        needs_teacher = False

        def forward(self, batch, student, teacher, state):
            return student["logits"].sum() * float("nan")

    nan_recipe = Recipe.cross_entropy()
    nan_recipe.terms["ce"] = NaNLoss()
    with pytest.raises(FloatingPointError, match=r"stage test, epoch 1, batch 0: ce=nan"):
        engine.fit(
            _stage(small_digits, nan_recipe),
            small_digits.train,
            small_digits.val,
            CPU,
            engine.resolve_precision("32", CPU),
            progress=False,
        )


class _BadAt(Term):
    """Cross-entropy plus ``bad[(epoch, step)]`` at those steps (a constant: the gradients stay finite)."""

    needs_teacher = False

    def __init__(self, bad: dict, steps_per_epoch: int):
        super().__init__()
        self.bad, self.per_epoch, self.calls = bad, steps_per_epoch, 0

    def forward(self, batch, student, teacher, state):
        where = (state.epoch, self.calls % self.per_epoch)
        self.calls += 1
        return torch.nn.functional.cross_entropy(student["logits"], batch["target"]) + self.bad.get(where, 0.0)


@pytest.fixture(scope="module")
def many_steps():  # batches of 2: more steps per epoch than engine.SYNC_EVERY
    return digits(image_size=16, batch_size=2, limit=128)


def _fit_bad_at(data, bad, checkpoint_dir=None, epochs=1):
    recipe = Recipe.cross_entropy()
    recipe.terms["ce"] = _BadAt(bad, len(data.train))
    return engine.fit(
        _stage(data, recipe, epochs=epochs),
        data.train,
        data.val,
        CPU,
        engine.resolve_precision("32", CPU),
        checkpoint_dir=checkpoint_dir,
        progress=False,
    )


def test_non_finite_check_names_the_first_bad_step_mid_window(many_steps):
    first, later = engine.SYNC_EVERY + 3, engine.SYNC_EVERY + 7  # both in the second window
    assert len(many_steps.train) > later
    # a one-off inf (training would recover from it) before a NaN: the inf's step is named
    with pytest.raises(FloatingPointError, match=rf"stage test, epoch 1, batch {first}: ce=inf$"):
        _fit_bad_at(many_steps, {(0, first): float("inf"), (0, later): float("nan")})
    with pytest.raises(FloatingPointError, match=r"stage test, epoch 1, batch 5: ce=nan$"):
        _fit_bad_at(many_steps, {(0, 5): float("nan")})


def test_non_finite_loss_in_an_epochs_last_steps_stops_before_its_checkpoint(many_steps, tmp_path):
    last_step = len(many_steps.train) - 1  # in the epoch's last, partial window
    assert (last_step + 1) % engine.SYNC_EVERY
    with pytest.raises(FloatingPointError, match=rf"epoch 2, batch {last_step}: ce=nan; the last good checkpoint is"):
        _fit_bad_at(many_steps, {(1, last_step): float("nan")}, tmp_path, epochs=2)
    assert torch.load(tmp_path / "test_last.pt", weights_only=True)["epoch"] == 1


def test_the_loop_reads_the_device_per_epoch_not_per_step(many_steps, monkeypatch):
    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    epochs, steps = 2, len(many_steps.train)
    history = engine.fit(
        _stage(many_steps, epochs=epochs),
        many_steps.train,
        many_steps.val,
        CPU,
        engine.resolve_precision("32", CPU),
        progress=False,
    )
    monkeypatch.undo()
    assert len(history) == epochs and steps > 2 * engine.SYNC_EVERY
    checks = -(-steps // engine.SYNC_EVERY)  # the non-finite check: once per SYNC_EVERY steps and at the epoch's end
    assert reads["n"] <= epochs * (checks + 6), reads  # was 3 or more per step


def test_on_epoch_adds_to_the_record_and_can_stop_training(small_digits):
    fp32 = engine.resolve_precision("32", CPU)

    def add(epoch, record, model):
        record["extra/epoch"] = float(epoch) + record["val/acc"]

    history = engine.fit(
        replace(_stage(small_digits, epochs=2), on_epoch=add),
        small_digits.train,
        small_digits.val,
        CPU,
        fp32,
        progress=False,
    )
    assert [h["extra/epoch"] - h["val/acc"] for h in history] == [0.0, 1.0]

    def stop(epoch, record, model):
        if epoch == 1:
            raise KeyboardInterrupt  # a search's pruner raises its own exception; the loop lets it through

    stage = replace(_stage(small_digits, epochs=3), on_epoch=stop)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(stage, small_digits.train, small_digits.val, CPU, fp32, progress=False)


def test_same_seed_same_run(small_digits):
    runs = []
    for _ in range(2):
        stage = _stage(small_digits, epochs=2)
        engine.fit(
            stage, small_digits.train, small_digits.val, CPU, engine.resolve_precision("32", CPU), progress=False
        )
        runs.append(stage.model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_warmup_cosine_schedule_values():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = engine.warmup_cosine(opt, epochs=2, steps_per_epoch=5, warmup_epochs=1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == pytest.approx(1.0) and lrs[-1] < 0.1 and all(a >= b for a, b in itertools.pairwise(lrs[5:]))


def test_atomic_save_leaves_no_temp_files(tmp_path):
    storage.atomic_save({"a": torch.ones(2)}, tmp_path / "sub" / "x.pt")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.pt"]


def test_batches_are_reproducible_per_epoch_and_differ_between_epochs(small_digits):
    train = small_digits.train
    train.set_epoch(1)
    a = [b["index"] for b in train]
    b = [b["index"] for b in train]
    train.set_epoch(2)
    c = [b["index"] for b in train]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert sorted(torch.cat(a).tolist()) == list(range(len(train.targets)))


def test_random_shift_moves_content_within_the_padding():
    image = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    image[:, :, 4, 4] = 255
    out = Augment(crop_padding=2)(image, torch.Generator().manual_seed(0))
    rows, cols = (out[:, 0] == 255).nonzero()[:, 1], (out[:, 0] == 255).nonzero()[:, 2]
    assert len(rows) == 64 and rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # shifts are drawn, not fixed
    flipped = Augment(hflip=True)(
        image[:, :, :, :] * 0 + torch.arange(9, dtype=torch.uint8), torch.Generator().manual_seed(0)
    )
    firsts = set(flipped[:, 0, 0, 0].tolist())
    assert firsts == {0, 8}


def test_digits_split_is_stratified_seeded_and_disjoint():
    import numpy as np

    y = np.repeat(np.arange(5), 40)
    test, val, train = stratified_split(y, [0.2, 0.1], seed=0)
    assert len(test) == 40 and len(val) == 20 and len(train) == 140
    assert set(test).isdisjoint(val) and set(val).isdisjoint(train)
    assert np.bincount(y[test]).tolist() == [8] * 5
    again = stratified_split(y, [0.2, 0.1], seed=0)
    assert all((a == b).all() for a, b in zip(again, (test, val, train)))
    data = digits()
    assert sum(map(sum, data.class_counts.values())) == 1797
    assert data.train.images.shape[1:] == (3, 32, 32) and data.num_classes == 10


@pytest.mark.parametrize(
    "speed", [engine.Speed(channels_last=True), engine.Speed(compile=True)], ids=["channels_last", "compile"]
)
@pytest.mark.slow
def test_speed_options_train_the_same_model(small_digits, speed):
    plain = engine.fit(
        _stage(small_digits, epochs=2),
        small_digits.train,
        small_digits.val,
        CPU,
        engine.resolve_precision("32", CPU),
        progress=False,
    )
    stage = _stage(small_digits, epochs=2)
    fast = engine.fit(
        stage,
        small_digits.train,
        small_digits.val,
        CPU,
        engine.resolve_precision("32", CPU),
        progress=False,
        speed=speed,
    )
    for a, b in zip(plain, fast):  # same arithmetic up to kernel order
        assert b["loss/ce"] == pytest.approx(a["loss/ce"], rel=1e-3)
        assert b["val/acc"] == pytest.approx(a["val/acc"], abs=0.02)
    if speed.channels_last:
        assert stage.model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_each_stage_logs_its_eta_once_after_its_first_epoch(small_digits, caplog):
    with caplog.at_level(logging.INFO):
        engine.fit(_stage(small_digits, epochs=3), small_digits.train, small_digits.val, CPU,
                   engine.resolve_precision("32", CPU), progress=False)  # fmt: skip
    etas = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert len(etas) == 1 and etas[0].startswith("test: ETA about ") and "for the 2 epoch(s) left" in etas[0]


def test_an_exploding_loss_is_named_once_with_the_fix(small_digits, caplog):
    stage = replace(_stage(small_digits, epochs=2), optimizer=partial(torch.optim.SGD, lr=1e4))  # trainer.optimizer.lr
    with caplog.at_level(logging.WARNING):
        try:
            engine.fit(stage, small_digits.train, small_digits.val, CPU, engine.resolve_precision("32", CPU),
                       progress=False)  # fmt: skip
        except FloatingPointError:  # it may overflow to inf at once; the NaN guard names that
            pytest.skip("the loss overflowed at once: the non-finite guard covers it")
    diverged = [r.getMessage() for r in caplog.records if "training diverged" in r.getMessage()]
    assert len(diverged) == 1 and "test.optimizer.lr ten times smaller" in diverged[0]
