"""``distill-search``: which student should I ship? The Hydra entry point over the same config tree as
distill-run (conf/distill_search.yaml adds the ``search`` group); the work is in :mod:`.driver`.

Docs: docs/guide/search.md
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from distill_runner.cli import resume_line, run_app
from distill_runner.errors import UserError

log = logging.getLogger(__name__)


class SearchSweepNote(Callback):
    """After ``distill-search -m`` (workers started through a Hydra launcher, sweeping ``search.worker``): where
    the report is. It replaces distill-run's sweep summary, which reads run folders a search does not write."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        main = "the folder of the job with search.worker=0 (search.role=main)"
        log.info("search report: report.md and best.json in %s under %s", main, config.hydra.sweep.dir)


@hydra.main(config_path="pkg://distill_runner.conf", config_name="distill_search", version_base="1.3")
def search_from_config(cfg: DictConfig) -> None:
    from distill_runner.config import validate  # imported here so --help and --cfg stay fast
    from distill_runner.search.driver import search

    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    spec = None
    try:
        spec = validate(cfg)  # every key, the search node and its space too, once, before any work
        search(spec, folder, list(hydra_cfg.overrides.task), list(hydra_cfg.overrides.hydra))
    except KeyboardInterrupt:  # the running trial is enqueued again: the next start retries it
        main_process = spec is None or (spec.search.role == "main" and spec.search.worker == 0)
        if main_process:  # a worker's Ctrl-C is its main process's: that one says how to continue
            print(resume_line("distill-search", folder.resolve(), []), file=sys.stderr)
        log.info("interrupted (Ctrl-C)")
        sys.exit(130)
    except UserError as exc:  # ConfigError, StorageError
        # One line, no traceback: the message names the key, the bad value and the fix.
        print(f"distill-search: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    run_app("distill-search", search_from_config)


if __name__ == "__main__":
    main()
