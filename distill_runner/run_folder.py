"""The run folder: which one a resumed run continues, and whether it (and the cache) can take what
the run will write, checked before any training."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_runner import storage
from distill_runner.build import build_model
from distill_runner.errors import ConfigError
from distill_runner.models.factories import count_parameters
from distill_runner.train.stages import RunContext


def check_room(ctx: RunContext, student: nn.Module, extra_teachers: dict) -> None:
    """Before training: the run folder and the cache are writable and their disks hold what the run
    will write (checkpoints of every stage, cached teachers and teacher outputs)."""
    cfg = ctx.cfg
    teacher_params = count_parameters(build_model(cfg.teacher, "teacher", ctx.data, cfg.seed))
    teachers = teacher_params * (1 + len(extra_teachers))
    run_bytes = storage.checkpoint_bytes(teachers) + 2 * storage.checkpoint_bytes(count_parameters(student))
    storage.check_writable(ctx.run_dir, "hydra.run.dir")
    storage.check_free_space(
        ctx.run_dir, run_bytes, "hydra.run.dir", "checkpoints of the teacher, the student and the baseline"
    )
    cache = ctx.cache
    if cache is not None:
        outputs_mb = min(
            cfg.cache.max_teacher_outputs_mb,
            ctx.data.train.num_samples * cfg.trainer.epochs * ctx.data.num_classes * 4 / 2**20,
        )
        storage.check_writable(cache.root, "cache.dir")
        storage.check_free_space(
            cache.root, 4 * teachers + int(outputs_mb * 2**20), "cache.dir", "fine-tuned teachers and their outputs"
        )


def _without_resume(items) -> list:
    return [o for o in items if not o.lstrip("+~").startswith("trainer.resume")]


def resume_dir(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path:
    """The run folder to continue: ``trainer.resume=PATH``, or with ``true`` this run's folder if it
    holds checkpoints, else the newest unfinished run under the same outputs folder started with
    the same overrides. Its config must equal this one (but for ``trainer.resume``). With ``auto``:
    this run's folder, whatever it holds (a fixed ``hydra.run.dir``, a requeued Slurm job)."""
    resume = cfg.trainer.get("resume", False)
    if resume == "auto":
        return run_dir
    if resume is True:
        if (run_dir / "checkpoints").is_dir():
            found = run_dir
        else:
            root = run_dir.parent.parent  # outputs/<date>/<time> -> outputs
            candidates = [
                p.parent.parent
                for p in root.glob("*/*/.hydra/overrides.yaml")
                if p.parent.parent != run_dir
                and not (p.parent.parent / "metrics.json").exists()
                and (p.parent.parent / "checkpoints").is_dir()
                and _without_resume(OmegaConf.load(p)) == _without_resume(overrides)
            ]
            if not candidates:
                raise ConfigError(
                    "trainer.resume",
                    True,
                    f"no unfinished run with the same overrides under {root}/; name the run folder: "
                    "trainer.resume=outputs/<date>/<time>",
                )
            found = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        found = Path(str(resume)).expanduser()
        if not (found / ".hydra" / "config.yaml").is_file():
            raise ConfigError(
                "trainer.resume",
                str(resume),
                "not a run folder (no .hydra/config.yaml in it); give outputs/<date>/<time> of the run to continue",
            )
    saved_file = found / ".hydra" / "config.yaml"
    if saved_file.is_file() and found != run_dir:
        saved, now = OmegaConf.load(saved_file), OmegaConf.to_container(cfg)
        saved = OmegaConf.to_container(saved)
        saved["trainer"].pop("resume", None)
        now["trainer"].pop("resume", None)
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(
                "trainer.resume",
                str(resume),
                f"the run in {found} was started with another config (differs in: {', '.join(diff)}); resume it with "
                "the same overrides",
            )
    return found
