"""The GPU path as pytest runs it (marked ``gpu``: skipped where CUDA is not available, so CI on a CPU reports
them as skipped, never as passed). The full acceptance matrix is ``bash scripts/gpu_check.sh``."""

import math

import pytest
import torch
from conftest import TINY, compose_config

from distill_runner import runner

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.parametrize("precision", ["32", "16-mixed", "bf16-mixed"])
def test_a_tiny_kd_run_trains_every_stage_on_cuda(precision, tmp_path):
    cfg = compose_config([*TINY, "trainer.device=cuda", f"trainer.precision={precision}", "cache.enabled=false"])
    results = runner.run(cfg, tmp_path / "run")
    assert results.device.startswith("cuda") and results.precision == precision
    assert set(results.models) >= {"teacher", "student", "baseline"}
    for name, model in results.models.items():
        assert 0.0 <= model.test_acc <= 1.0, name
    for name, stage in results.stages.items():
        losses = [v for record in stage.history for k, v in record.items() if k.startswith("loss/")]
        assert losses and all(math.isfinite(v) for v in losses), name


def test_replayed_teacher_outputs_equal_online_on_cuda(tmp_path):
    """A recipe with feature terms replays the same per-batch losses on the GPU as online (float32 storage)."""
    base = [*TINY, "trainer.device=cuda", "distill=combo", "cache.dir=cache", "cache.teacher_outputs_dtype=float32"]
    online = runner.run(compose_config([*base, "++distill.teacher_outputs=online"]), tmp_path / "online")
    replayed = runner.run(compose_config(base), tmp_path / "replayed")
    a, b = online.stages["student"].history, replayed.stages["student"].history
    for ra, rb in zip(a, b):
        for key in (k for k in ra if k.startswith("loss/")):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3), key
    assert torch.cuda.is_available()
