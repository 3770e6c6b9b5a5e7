"""Which checkpoint an interrupted stage resumes from: ``<stage>_last.pt``, or the copy of it kept before
it was last overwritten when it is damaged."""

from __future__ import annotations

import logging
from pathlib import Path

from distill_runner.errors import ConfigError
from distill_runner.storage import DamagedFile, load_verified

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
