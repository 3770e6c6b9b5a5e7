"""``distill-run``: the Hydra entry point. Thin on purpose: the work is in :mod:`distill_runner.runner`."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distill_runner.errors import ConfigError


@hydra.main(config_path="pkg://distill_runner.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from distill_runner.runner import run  # imported here so --help and --cfg stay fast

    hydra_cfg = HydraConfig.get()
    try:
        metrics = run(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))
    except ConfigError as exc:
        # One line, no traceback: the message names the key, the bad value and the fix.
        print(f"distill-run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as exc:  # a NaN/inf loss: say where, keep the checkpoints, no traceback
        print(f"distill-run: error: {exc}", file=sys.stderr)
        sys.exit(3)
    # The objective for sweepers such as Optuna: validation, never test, accuracy.
    return metrics["stages"]["distill"]["final_val_acc"]


if __name__ == "__main__":
    main()
