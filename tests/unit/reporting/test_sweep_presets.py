"""The launcher presets compose (the `sweep` extra installs their plugins); Optuna searches are distill-search's
(tests/unit/search/test_search.py)."""

import pytest
from hydra import compose, initialize_config_module


def compose_hydra(overrides):
    with initialize_config_module(config_module="distill_runner.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "override,target",
    [
        ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("hydra/launcher=submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("hydra/launcher=submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ],
)
def test_launcher_presets_compose(override, target):
    cfg = compose_hydra([override])
    assert cfg.hydra.launcher._target_ == target


def test_slurm_preset_is_one_gpu_per_job_with_requeue():
    launcher = compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.distill_runner_slurm.slurm_launcher.SlurmLauncher"
    )  # submitit, one-line faults
    assert (
        launcher.gpus_per_node == 1
        and launcher.tasks_per_node == 1
        and launcher.max_num_timeout >= 1
        and launcher.partition == "gpu"
    )


def test_sweep_summary_callback_is_registered():
    cfg = compose_hydra([])
    assert cfg.hydra.callbacks.sweep_summary._target_ == "distill_runner.callbacks.SweepSummary"
    assert cfg.hydra.callbacks.output_folder_check._target_ == "distill_runner.callbacks.OutputFolderCheck"
    assert cfg.hydra.sweep.dir.startswith("outputs/multirun/")
