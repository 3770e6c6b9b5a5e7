"""The Hydra callbacks conf/config.yaml registers: the command-line layer, where Hydra's own config (run and
sweep folders, overrides, the sweeper) is read; the work is in :mod:`distill_runner.io.storage` and
:mod:`distill_runner.reporting.sweep`.

Docs: docs/guide/sweeps-and-cache.md
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distill_runner.errors import UserError
from distill_runner.io import trust
from distill_runner.io.storage import check_writable
from distill_runner.reporting.sweep import SWEPT_ENV, write_summary

log = logging.getLogger(__name__)


class OutputFolderCheck(Callback):
    """Before Hydra creates the run (or sweep) folder: it and the cache are writable, the cache is yours."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")

    def _check(self, config: DictConfig, key: str) -> None:
        try:
            check_writable(OmegaConf.select(config, key), key)
            if OmegaConf.select(config, "cache.enabled", default=False):
                check_writable(OmegaConf.select(config, "cache.dir"), "cache.dir")
            get = lambda k: OmegaConf.select(config, k, default=None)  # not validated yet: the raw values
            trust.check_folders(get("cache.dir") if get("cache.enabled") else None, bool(get("cache.shared")),
                                get("dataset.store_dir") if get("dataset.decode_cache") else None)  # fmt: skip
        except UserError as exc:  # Hydra would print a traceback: one line instead
            app = OmegaConf.select(config, "hydra.help.app_name", default=None) or "distill-run"  # or distill-search
            print(f"{app}: error: {exc}", file=sys.stderr)
            sys.exit(2)


def swept_in(config: DictConfig) -> list[str]:
    """The keys a multirun varies: its command line's sweep overrides (``distill.temperature=1,4``) and the
    sweeper's search space (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return keys + list(OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})


class SweepSummary(Callback):
    """Hydra callback: name the job folders by what the sweep varies; write the sweep summary once all jobs of a
    multirun are done."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            os.environ[SWEPT_ENV] = ",".join(swept_in(config))
        except Exception as exc:  # folders then name every override: not worth stopping the sweep for
            log.warning("could not tell the swept keys apart (%s): job folders name every override", exc)
            os.environ.pop(SWEPT_ENV, None)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            write_summary(sweep_dir)
        except Exception as exc:  # Hydra swallows callback errors: say it loudly
            log.error(
                "could not write the sweep summary in %s: %s; rebuild it with: distill-report %s",
                sweep_dir,
                exc,
                sweep_dir,
            )
            print(
                f"distill-run: error: sweep summary failed: {exc}; rebuild it with: distill-report {sweep_dir}",
                file=sys.stderr,
            )
