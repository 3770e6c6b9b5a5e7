"""``distill-run``: the Hydra entry point. Thin on purpose: the work is in :mod:`distill_runner.runner`.

Under torchrun (``torchrun --nproc_per_node=N -m distill_runner ...``) every process runs this;
processes other than rank 0 get Hydra overrides that keep them from writing anything (no run
folder, no log file): rank 0 owns the run folder and tells the others where it is.

Docs: docs/guide/configuration.md
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from distill_runner import distributed
from distill_runner.errors import UserError

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


def sweep_job_folder(num, overrides) -> str:
    """``hydra.sweep.subdir`` (conf/config.yaml); imported when a multirun names its jobs, so ``--help`` stays fast
    and the names do not depend on the sweep-summary callback being configured."""
    from distill_runner.reporting.sweep import job_folder

    return job_folder(num, overrides)


OmegaConf.register_new_resolver("distill_job_folder", sweep_job_folder, replace=True)
QUICKSTART_DATASET = "digits"  # conf/experiment/quickstart.yaml's data set: the experiment conf/config.yaml defaults to
CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")  # Hydra flags taking a value
HOME_VALUE = re.compile(r"(\+{0,2}[\w.@/-]+)=(~[^,'\"\[\]{}]*)")  # key=~/path (one value, not a sweep)


def expand_home(arg: str) -> str:
    """``key=~/path`` as ``key=/home/me/path``: Hydra's override grammar refuses an unquoted ``~`` in a value,
    and the shell leaves it alone there (``key`` is not a shell variable name)."""
    found = HOME_VALUE.fullmatch(arg)
    if found is None:
        return arg
    path = os.path.expanduser(found.group(2))
    if re.fullmatch(r"[\w./@:+-]+", path) is None:  # Hydra reads anything else (spaces, ...) only quoted
        path = f'"{path}"' if "'" in path else f"'{path}'"
    return f"{found.group(1)}={path}"


def group_choice(args: list[str], group: str) -> str | None:
    """The option the command line gives config group ``group`` (the last one given), else None."""
    chosen = [a.split("=", 1)[1] for a in args if "=" in a and a.split("=", 1)[0].lstrip("+") == group]
    return chosen[-1] if chosen else None


def command_line(args: list[str]) -> list[str]:
    """The command line as Hydra reads it: ``~`` expanded in path values, and no quickstart for another data
    set. ``experiment=quickstart`` is the default so that ``distill-run`` alone runs it; naming a data set other
    than its digits without an experiment runs that data set with its own defaults (``~experiment``: the
    quickstart's digits-tuned teacher settings left out) and names the run after it, not "quickstart"."""
    args = [expand_home(a) for a in args]
    dataset = group_choice(args, "dataset")
    named = any(a.lstrip("+~").split("=", 1)[0] == "experiment" for a in args)
    if dataset is not None and dataset != QUICKSTART_DATASET and not named:
        at = max(i for i, a in enumerate(args) if a.split("=", 1)[0].lstrip("+") == "dataset")
        args.insert(at + 1, "~experiment")  # beside the overrides: argparse takes them as one run of words
    return args


def resume_line(app: str, folder, extra: list[str]) -> str:
    """One line after Ctrl-C: the command that continues in ``folder`` (None: nothing was written yet)."""
    if folder is None:
        return f"{app}: interrupted before it started; run the same command again"
    hydra_cfg = HydraConfig.get()
    drop = ("trainer.resume=", "hydra.run.dir=", "search.role=", "search.worker=")
    argv = sys.argv
    flags = [a for i, a in enumerate(argv[1:]) if a.split("=")[0] in CONFIG_FLAGS or (i and argv[i] in CONFIG_FLAGS)]
    kept = [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.searchpath=")]
    kept += [o for o in hydra_cfg.overrides.task if not o.startswith(drop)]
    command = shlex.join([app, *flags, *kept, f"hydra.run.dir={folder}", *extra])
    return f"{app}: interrupted; continue with: {command}"


@hydra.main(config_path="pkg://distill_runner.conf", config_name="config", version_base="1.3")
def run_from_config(cfg: DictConfig) -> float | None:
    from distill_runner.runner import run  # imported here so --help and --cfg stay fast

    hydra_cfg = HydraConfig.get()
    try:
        results = run(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))
    except KeyboardInterrupt as exc:  # Ctrl-C: the checkpoints stay; say how to continue, no traceback
        print(resume_line("distill-run", getattr(exc, "run_dir", None), ["trainer.resume=auto"]), file=sys.stderr)
        sys.exit(130)
    except UserError as exc:
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
    run_app("distill-run", run_from_config)


def run_app(app: str, entry) -> None:
    """``entry`` (a ``@hydra.main`` function) on the command line as :func:`command_line` rewrites it; Ctrl-C while
    Hydra composes the config, before any work, is one line."""
    sys.argv[1:] = command_line(sys.argv[1:])
    from distill_runner import slurm  # hydra/launcher=slurm: Slurm is installed, sacct's failures said once

    slurm.prepare(app, sys.argv[1:], group_choice(sys.argv[1:], "hydra/launcher"))
    try:
        entry()
    except KeyboardInterrupt:
        print(resume_line(app, None, []), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
