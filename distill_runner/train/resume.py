"""A stage's checkpoints: ``<stage>_last.pt`` (everything needed to continue, written after every epoch), the copy
of it kept before it was last overwritten (``<stage>_last.prev.pt``, for when it is damaged) and
``<stage>_best.pt`` (the weights of the epoch with the best validation accuracy so far).

Docs: docs/guide/resume-and-faults.md
"""

from __future__ import annotations

import logging
from pathlib import Path

from distill_runner.errors import ConfigError
from distill_runner.io.storage import DamagedFile, keep_previous, load_verified, save_verified

log = logging.getLogger(__name__)


def previous_checkpoint(last: Path) -> Path:
    return last.with_name(f"{last.stem}.prev.pt")  # teacher_last.pt -> teacher_last.prev.pt


def resume_state(last: Path, name: str) -> tuple[dict, Path] | None:
    """The newest good checkpoint to resume stage ``name`` from: ``last``, else the one before it
    (``<stage>_last.prev.pt``); None when there is neither. Damaged files are named in a warning; when
    every one is damaged the run stops with one line (resuming from epoch 0 would be a silent loss)."""
    damaged = []
    for path in (last, previous_checkpoint(last)):
        if not path.is_file():
            continue
        try:
            state = load_verified(path)
        except DamagedFile as exc:
            log.warning("%s: %s", name, exc)
            damaged.append(exc)
            continue
        if damaged:
            log.warning("%s: resuming from the previous checkpoint %s instead (one epoch is trained again)", name, path)
        return state, path
    if not damaged:
        return None
    files = " and ".join(str(exc.path) for exc in damaged)
    fix = (f"cannot resume stage {name}: {files} damaged ({damaged[0].reason}); delete "
           f"{'them' if len(damaged) > 1 else 'it'} to train the stage again from its first epoch")  # fmt: skip
    raise ConfigError("trainer.resume", str(last), fix)


class StageCheckpoints:
    """The checkpoints of stage ``stage`` in ``folder``."""

    def __init__(self, folder: Path, stage: str):
        self.stage = stage
        self.last = Path(folder) / f"{stage}_last.pt"
        self.best = self.last.with_name(f"{stage}_best.pt")

    def newest_good(self) -> tuple[dict, Path] | None:
        """The state to resume from and its file (see :func:`resume_state`)."""
        return resume_state(self.last, self.stage)

    def where_to_restart(self) -> str:
        """The end of a non-finite-loss error: the last good checkpoint, when one was written."""
        return f"; the last good checkpoint is {self.last}" if self.last.is_file() else ""

    def save(self, state: dict, history: list[dict]) -> None:
        """Write ``state`` (after epoch ``state["epoch"]``) as the last checkpoint, keeping the one before; and its
        weights as the best when the epoch's validation accuracy is the best so far (ties: the later)."""
        keep_previous(self.last, previous_checkpoint(self.last))  # a damaged _last.pt falls back on it
        save_verified(state, self.last)
        val_acc = history[-1]["val/acc"]
        if val_acc >= max(h["val/acc"] for h in history):
            save_verified({"model": state["model"], "epoch": state["epoch"], "val_acc": val_acc}, self.best)
