"""``distill-run``: the Hydra entry point. Thin on purpose: the work is in :mod:`distill_runner.runner`.

Under torchrun (``torchrun --nproc_per_node=N -m distill_runner ...``) every process runs this;
processes other than rank 0 get Hydra overrides that keep them from writing anything (no run
folder, no log file): rank 0 owns the run folder and tells the others where it is.
"""

from __future__ import annotations

import importlib.resources
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from distill_runner import distributed
from distill_runner.errors import ConfigError

SILENT_RANK = [
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled",
]


NOT_RUN_GROUPS = ("hydra", "search")  # Hydra's own groups (listed apart); conf/search/ is distill-search's


def run_groups() -> str:
    """``distill-run --help``'s "Groups and their options" (``${distill_run_groups:}`` in its template):
    Hydra's $APP_CONFIG_GROUPS lists every group under conf/, distill-search's ``search`` too."""
    conf = importlib.resources.files("distill_runner.conf")
    lines = []
    for group in sorted((g for g in conf.iterdir() if g.is_dir() and g.name not in NOT_RUN_GROUPS), key=str):
        options = sorted(p.name.removesuffix(".yaml") for p in group.iterdir() if p.name.endswith(".yaml"))
        if options:
            lines.append(f"{group.name}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("distill_run_groups", run_groups, replace=True)


@hydra.main(config_path="pkg://distill_runner.conf", config_name="config", version_base="1.3")
def run_from_config(cfg: DictConfig) -> float | None:
    from distill_runner.runner import run  # imported here so --help and --cfg stay fast

    hydra_cfg = HydraConfig.get()
    try:
        results = run(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))
    except ConfigError as exc:
        # One line, no traceback: the message names the key, the bad value and the fix.
        print(f"distill-run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as exc:  # a NaN/inf loss: say where, keep the checkpoints, no traceback
        print(f"distill-run: error: {exc}", file=sys.stderr)
        sys.exit(3)
    finally:
        distributed.shutdown()
    # The objective for sweepers such as Optuna: validation, never test, accuracy.
    return results.stages["student"].final_val_acc if results is not None else None


def main() -> None:
    if distributed.launched():
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            print(
                "distill-run: error: a sweep (-m) cannot run under torchrun: run the sweep with distill-run -m and "
                "one device per job, "
                "or launch torchrun once per configuration (see the README, 'More than one GPU')",
                file=sys.stderr,
            )
            sys.exit(2)
        if distributed.env_rank() != 0:
            sys.argv += SILENT_RANK
    run_from_config()


if __name__ == "__main__":
    main()
