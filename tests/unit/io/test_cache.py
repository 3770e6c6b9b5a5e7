"""The teacher is trained once per sweep; cached teacher outputs replay the online teacher."""

import json
import subprocess
import sys
from functools import partial

import pytest
import torch
from conftest import TINY, compose_config
from distill_process import distill_run, start_distill_run
from PIL import Image

from distill_runner import build as builders
from distill_runner import runner
from distill_runner.build import build_data, build_model, build_recipe
from distill_runner.data.digits import digits
from distill_runner.distill.recipe import Recipe
from distill_runner.distill.signals import (
    OnlineTeacher,
    ReplayedTeacher,
    compute_teacher_outputs,
    online_signal,
    store_mb,
    stored_shapes,
)
from distill_runner.evaluation import metrics as measure
from distill_runner.models.factories import tiny_cnn, torchvision_model
from distill_runner.reporting import plots
from distill_runner.train import engine

CPU = torch.device("cpu")
FP32 = engine.resolve_precision("32", CPU)


@pytest.fixture(scope="module")
def setup():
    data = digits(image_size=16, batch_size=16, limit=64, crop_padding=2, hflip=True)
    torch.manual_seed(0)
    teacher = torchvision_model("resnet18", num_classes=10, image_size=16).eval()
    return data, teacher


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_cached_kd_losses_match_online_per_batch(setup, dtype, tolerance):
    data, teacher = setup
    online = OnlineTeacher(teacher)
    cached = ReplayedTeacher(
        compute_teacher_outputs(online, data.train, views=3, device=CPU, precision=FP32, dtype=dtype, progress=False)[
            "logits"
        ]
    )
    kd = Recipe.hinton(4, 0.9)
    student = tiny_cnn(num_classes=10, hidden=16).eval()
    compared = 0
    for epoch in range(3):
        data.train.set_epoch(epoch)
        cached.set_epoch(epoch)
        for batch in data.train:
            s = {"logits": student(batch["image"])}
            a, b = kd(batch, s, online(batch)), kd(batch, s, cached(batch))
            assert a["kd"].item() == pytest.approx(b["kd"].item(), rel=tolerance, abs=tolerance)
            compared += 1
    assert compared == 3 * len(data.train)


def test_cached_and_online_training_give_the_same_student(setup):
    data, teacher = setup
    online = OnlineTeacher(teacher)
    cached = ReplayedTeacher(
        compute_teacher_outputs(
            online, data.train, views=2, device=CPU, precision=FP32, dtype=torch.float32, progress=False
        )["logits"]
    )
    students = []
    for signal in (online, cached):
        torch.manual_seed(0)
        model = tiny_cnn(num_classes=10, hidden=16)
        stage = engine.Stage(
            "distill",
            model,
            Recipe.hinton(4, 0.5),
            2,
            partial(torch.optim.SGD, lr=0.05),
            partial(engine.warmup_cosine),
            teacher=signal,
        )
        engine.fit(stage, data.train, data.val, CPU, FP32, progress=False)
        students.append(model.state_dict())
    for key in students[0]:
        assert torch.allclose(students[0][key].float(), students[1][key].float(), atol=1e-5), key


@pytest.mark.slow
def test_run_reuses_teacher_and_outputs_and_reports_it(tmp_path, caplog, monkeypatch):
    # every timing is a new value (ms = call number), so a borrowed one shows
    calls = []

    def latency(*args, **kwargs):
        calls.append("latency")
        return measure.Latency(len(calls) / 1e3, 5, 1, [len(calls) / 1e3], 1.0, None)  # a stable measurement

    def throughput(*args, **kwargs):
        calls.append("throughput")
        return float(len(calls))

    monkeypatch.setattr(measure, "latency", latency)
    monkeypatch.setattr(measure, "throughput", throughput)
    built, build_model = [], builders.build_model

    def counted(node, key, *args, **kwargs):
        built.append(key)
        return build_model(node, key, *args, **kwargs)

    monkeypatch.setattr(builders, "build_model", counted)
    drawn_before = plots._confusion_image.cache_info()
    cfg = compose_config(TINY + [f"cache.dir={tmp_path / 'cache'}"])
    with caplog.at_level("INFO"):
        first = runner.run(cfg, tmp_path / "a")
        second = runner.run(cfg, tmp_path / "b")
        timed_again = len(calls)
        third = runner.run(
            compose_config(TINY + [f"cache.dir={tmp_path / 'cache'}", "eval.speed=measure"]), tmp_path / "c"
        )
    assert caplog.text.count("fine-tuning teacher") == 1 and caplog.text.count("reusing teacher") == 2
    assert built.count("teacher") == 3  # once per run: binding the recipe, sizing the run and training share it
    drawn = plots._confusion_image.cache_info()
    assert drawn.hits - drawn_before.hits >= 4  # the 2nd and 3rd runs draw the teacher's and baseline's once more
    assert "computed and stored" in caplog.text and "reused from" in caplog.text
    assert first.stages["teacher"].reused is False and second.stages["teacher"].reused is True
    assert first.stages["baseline"].reused is False and second.stages["baseline"].reused is True
    assert "reusing the evaluation of teacher" in caplog.text
    # one timing session per run that times: the teacher, then the student's architecture once (the scratch
    # baseline is its twin); the second run reuses the first's session whole, eval.speed=measure times again
    assert timed_again == 4 and len(calls) == 8
    assert first.speed_source == third.speed_source == "timed in this run"
    assert "timed together" in second.speed_source and "eval.speed=cached" in second.speed_source
    assert first.models["student"].latency_ms == first.models["baseline"].latency_ms
    written = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert written["speed_source"] == second.speed_source
    for role in ("teacher", "student", "baseline"):
        assert second.models[role].latency_ms == first.models[role].latency_ms  # one session, never mixed
        assert third.models[role].latency_ms > first.models[role].latency_ms
        assert written["models"][role]["images_per_s"] == second.models[role].images_per_s
        assert first.models[role].test_acc == second.models[role].test_acc  # quality is reused
    for run in (first, second, third):
        assert run.models["student"].speedup == pytest.approx(
            run.models["student"].images_per_s / run.models["teacher"].images_per_s
        )
    a = torch.load(tmp_path / "a" / "checkpoints" / "teacher.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "teacher.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def loaded_teacher(tmp_path_factory) -> list[str]:
    """TINY with a saved untrained teacher used as loaded (the cache on): for the tests of what happens to the
    teacher's outputs, which do not need the teacher fine-tuned in every run."""
    cfg = compose_config(TINY)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(builders.build_teacher(cfg.teacher, "teacher", build_data(cfg), cfg.seed).state_dict(), path)
    return [*TINY, "teacher.epochs=0", f"teacher.checkpoint={path}"]


@pytest.mark.slow
def test_cached_mode_equals_online_mode_end_to_end(loaded_teacher, tmp_path):
    base = loaded_teacher + ["trainer.epochs=2", "cache.teacher_outputs_dtype=float32"]
    online = runner.run(
        compose_config(base + ["distill.teacher_outputs=online", "cache.enabled=false"]), tmp_path / "online"
    )
    cached = runner.run(
        compose_config(base + ["distill.teacher_outputs=cached", "cache.enabled=false"]), tmp_path / "cached"
    )
    h_online, h_cached = online.stages["student"].history, cached.stages["student"].history
    for a, b in zip(h_online, h_cached):
        assert a["loss/kd"] == pytest.approx(b["loss/kd"], rel=1e-4)
    assert online.models["student"].test_acc == cached.models["student"].test_acc


@pytest.mark.slow
def test_teacher_change_or_no_cache_trains_again(tmp_path, caplog):
    cache = f"cache.dir={tmp_path / 'cache'}"
    with caplog.at_level("INFO"):
        runner.run(compose_config(TINY + [cache]), tmp_path / "a")
        runner.run(compose_config(TINY + [cache, "teacher.optimizer.lr=0.002"]), tmp_path / "b")
        runner.run(compose_config(TINY + [cache, "cache.enabled=false"]), tmp_path / "c")
    assert caplog.text.count("fine-tuning teacher") == 2 and "reusing teacher" not in caplog.text
    assert caplog.text.count("stage teacher:") == 3


@pytest.mark.slow
def test_output_cap_falls_back_to_online(loaded_teacher, tmp_path, caplog):
    with caplog.at_level("INFO"):
        runner.run(compose_config(loaded_teacher + ["cache.max_teacher_outputs_mb=0"]), tmp_path / "run")
    assert "teacher outputs: online" in caplog.text and "cache.max_teacher_outputs_mb=0" in caplog.text


@pytest.mark.slow
def test_corrupt_cache_entry_is_rebuilt(tmp_path, caplog):
    cache = f"cache.dir={tmp_path / 'cache'}"
    runner.run(compose_config(TINY + [cache]), tmp_path / "a")
    (entry,) = (tmp_path / "cache" / "teachers").glob("*.model.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level("INFO"):
        runner.run(compose_config(TINY + [cache]), tmp_path / "b")
    assert f"cache entry {entry} is damaged" in caplog.text and "fine-tuning teacher" in caplog.text


@pytest.mark.slow
def test_two_processes_train_one_teacher(tmp_path):
    procs = [start_distill_run(*TINY, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path) for name in ("a", "b")]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    text = "\n".join(outputs)
    assert text.count("fine-tuning teacher") == 1 and text.count("reusing teacher") == 1
    a = torch.load(tmp_path / "a" / "checkpoints" / "teacher.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "teacher.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "outputs" / "cache").rglob("*.tmp*"))


@pytest.mark.slow
def test_multirun_trains_the_teacher_once_and_writes_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    grid = ["distill.temperature=1,4", "distill.alpha=0.25,0.75"]
    proc = distill_run("-m", *TINY, *grid, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = "\n".join(p.read_text() for p in sweep.glob("*/*.log"))
    assert logs.count("fine-tuning teacher") == 1 and logs.count("reusing teacher") == 3
    assert logs.count("training baseline") == 1 and logs.count("reusing baseline") == 3
    assert (
        logs.count("reusing the evaluation of teacher") == 3 and logs.count("reusing the evaluation of baseline") == 3
    )
    assert logs.count("stage student:") == 4
    assert logs.count("computed and stored") == 1 and logs.count("teacher outputs: cached") == 4
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("job,overrides,student_val_acc,student_acc,baseline_acc,teacher_acc")
    assert "distill.temperature=4 distill.alpha=0.75" in (sweep / "summary.md").read_text()
    with Image.open(sweep / "summary.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    # distill-report rebuilds it
    (sweep / "summary.png").unlink()
    rebuilt = subprocess.run(
        [sys.executable, "-m", "distill_runner.reporting.sweep", str(sweep)], capture_output=True, text=True
    )
    assert rebuilt.returncode == 0 and (sweep / "summary.png").is_file()
    assert "Best setting, chosen on the KD student's validation accuracy" in rebuilt.stdout


@pytest.mark.slow
def test_without_augmentation_one_view_serves_every_epoch(loaded_teacher, tmp_path, caplog):
    with caplog.at_level("INFO"):
        runner.run(compose_config(loaded_teacher + ["dataset.crop_padding=0", "trainer.epochs=3"]), tmp_path / "run")
    assert "cached, 1 augmented views" in caplog.text


@pytest.mark.slow
def test_feature_recipes_replay_too_and_a_logit_entry_never_serves_them(loaded_teacher, tmp_path, caplog):
    cache = f"cache.dir={tmp_path / 'cache'}"
    with caplog.at_level("INFO"):
        runner.run(compose_config(loaded_teacher + [cache, "distill=dkd"]), tmp_path / "dkd")
    assert "teacher outputs: cached, 1 augmented views x 48 images x (10 logits) as float16" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):  # same teacher, data and views: only what is stored differs
        runner.run(compose_config(loaded_teacher + [cache, "distill=attention"]), tmp_path / "attention")
    line = (
        "cached, 1 augmented views x 48 images x (10 logits + attention/layer2 8x8 + attention/layer3 4x4) as float16"
    )
    assert f"{line} = 0.01 MB (estimated 0.01 MB), computed and stored" in caplog.text
    assert len(list((tmp_path / "cache" / "teacher_outputs").glob("*.pt"))) == 2
    caplog.clear()
    with caplog.at_level("INFO"):  # stored: no teacher pass to estimate it, its file's size is checked instead
        runner.run(compose_config(loaded_teacher + [cache, "distill=attention"]), tmp_path / "again")
        runner.run(compose_config(loaded_teacher + [cache, "distill=attention", "cache.max_teacher_outputs_mb=0.001"]),
                   tmp_path / "limited")  # fmt: skip
    assert f"{line} = 0.01 MB (its stored file's size checked against the limit), reused from" in caplog.text
    assert "teacher outputs: online (they would take 0.01 MB > cache.max_teacher_outputs_mb=0.001" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_store_size_is_estimated_before_it_is_built(dtype):
    cfg = compose_config(TINY + ["distill=combo", "trainer.epochs=2"])
    data = build_data(cfg)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, "teacher", data, cfg.seed).eval()
    recipe = build_recipe(cfg, data, build_model(cfg.student, "student", data, cfg.seed))
    online = online_signal([teacher], None, recipe.teacher_layers)
    shapes = stored_shapes(online, recipe.summarize, data.train, CPU)
    # combo: the feature term keeps layer3 itself, attention only the maps of layer2 and layer3
    assert shapes == {"logits": (10,), "feature/layer3": (256, 4, 4), "attention/layer2": (8, 8),
                      "attention/layer3": (4, 4)}  # fmt: skip
    entry = compute_teacher_outputs(online, data.train, 2, CPU, FP32, dtype, False, recipe.summarize)
    stored = [entry["logits"], *(v for layers in entry["summaries"].values() for v in layers.values())]
    assert all(v.dtype == dtype for v in stored)
    assert store_mb(shapes, 2, data.train.num_samples, dtype) * 2**20 == sum(
        v.numel() * v.element_size() for v in stored
    )


@pytest.mark.slow
def test_above_the_cap_a_feature_recipe_says_so_and_runs_online(loaded_teacher, tmp_path, caplog):
    cache, cap = f"cache.dir={tmp_path / 'cache'}", "cache.max_teacher_outputs_mb=0.5"
    with caplog.at_level("INFO"):  # 48 images x (10 + 128x8x8 + 256x4x4) values as float16 = 1.1 MB
        feature = runner.run(compose_config(loaded_teacher + [cache, cap, "distill=feature"]), tmp_path / "feature")
    why = (
        "teacher outputs: online (they would take 1.13 MB > cache.max_teacher_outputs_mb=0.5; raise it to replay them)"
    )
    assert why in caplog.text and not (tmp_path / "cache" / "teacher_outputs").exists()
    assert feature.stages["student"].history[-1]["loss/feature"] > 0
    caplog.clear()
    with caplog.at_level("INFO"):  # the same cap holds a logit recipe's 1 KB
        runner.run(compose_config(loaded_teacher + [cache, cap, "distill=kd"]), tmp_path / "kd")
    assert "teacher outputs: cached" in caplog.text
