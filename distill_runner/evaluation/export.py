"""Export a trained model as ONNX and TorchScript and check that the exported files behave like
the model: the whole test split goes through each of them, and the report gives the largest logit
difference and the test accuracy after export.

ONNX needs the optional ``export`` extra (onnx, onnxscript for ``torch.onnx.export``, onnxruntime to
run the file): ``pip install 'distill-runner[export]'``. Without it the TorchScript export still
runs and the ONNX entry says what to install.

``distill-export RUN_DIR`` exports a finished run's student and updates its metrics.json and
report.md; ``distill-run export=onnx`` does the same at the end of the run.

Docs: docs/guide/evaluation-and-export.md
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from distill_runner.errors import ConfigError, UserError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'distill-runner[export]'"


def missing_modules(*names: str) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


@contextmanager
def quiet(*loggers: str):
    """Silence warnings and the INFO chatter of the exporters' loggers (a run logs at INFO)."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch.jit is deprecated in favour of torch.export; it still works
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Write ``model`` (fp32, CPU, eval) to ``path`` with a dynamic batch dimension, input
    ``image`` and output ``logits``; weights go inside the file unless they pass 1.5 GB."""
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.5e9
    with quiet("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            verbose=False,
            input_names=["image"],
            output_names=["logits"],
            external_data=big,
        )
    return path


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Trace ``model`` (fp32, CPU, eval) to TorchScript and save it to ``path``."""
    with quiet():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def onnx_runner(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def torchscript_runner(path: Path):
    with quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda x: module(x)


@torch.inference_mode()
def compare(run, model: nn.Module, loader) -> dict:
    """Run the split through ``run`` (images -> logits) and through ``model``: the largest absolute
    logit difference, the accuracy of ``run`` and the share of images with the same prediction."""
    diff, correct, same, n = 0.0, 0, 0, 0
    for batch in loader:
        x, y = batch["image"].float().cpu(), batch["target"]
        ref, out = model(x).float(), run(x).float()
        diff = max(diff, (out - ref).abs().max().item())
        correct += (out.argmax(1) == y).sum().item()
        same += (out.argmax(1) == ref.argmax(1)).sum().item()
        n += len(y)
    return {
        "max_abs_diff": diff,
        "test_acc": correct / n if n else float("nan"),
        "agreement": same / n if n else float("nan"),
    }


@torch.inference_mode()
def reference_accuracy(model: nn.Module, loader) -> float:
    correct = n = 0
    for batch in loader:
        correct += (model(batch["image"].float()).argmax(1) == batch["target"]).sum().item()
        n += len(batch["target"])
    return correct / n if n else float("nan")


def export_and_check(
    model: nn.Module, data, out_dir: str | Path, name: str = "student", formats=("onnx", "torchscript")
) -> dict:
    """Export a copy of ``model`` (fp32, CPU) to ``out_dir/<name>.onnx`` and
    ``out_dir/<name>.torchscript.pt``, run ``data.test`` through each and compare with the model.

    Returns ``{"model", "runtime", "reference_test_acc", "onnx": {...}, "torchscript": {...}}``
    where each format has path (relative to ``out_dir``'s parent, the run folder), size_bytes,
    max_abs_diff, test_acc and agreement (share of images with the same prediction), or a ``status``
    saying why it was skipped or failed. Export problems are reported, not raised: the run that
    produced the model has already finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    example = next(iter(data.test))["image"][:2].float().cpu()
    result: dict = {"model": name, "reference_test_acc": reference_accuracy(model, data.test)}
    runtimes = [f"torch {torch.__version__}"]
    steps = {
        "onnx": (f"{name}.onnx", export_onnx, onnx_runner, ("onnx", "onnxscript"), ("onnxruntime",)),
        "torchscript": (f"{name}.torchscript.pt", export_torchscript, torchscript_runner, (), ()),
    }
    for fmt in formats:
        filename, write, load, needed_to_write, needed_to_run = steps[fmt]
        path = out_dir / filename
        entry: dict = {"path": f"{out_dir.name}/{filename}"}  # relative to the run folder
        result[fmt] = entry
        if missing := missing_modules(*needed_to_write):
            entry.update(path=None, status=f"skipped: {', '.join(missing)} not installed ({INSTALL_HINT})")
            log.warning("%s export %s", fmt, entry["status"])
            continue
        try:
            write(model, example, path)
        except Exception as exc:  # an op the exporter does not support, ...
            entry.update(
                path=None, status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            log.warning("%s export of the %s %s", fmt, name, entry["status"])
            continue
        entry["size_bytes"] = sum(f.stat().st_size for f in out_dir.glob(f"{filename}*"))  # + external data, if any
        if missing := missing_modules(*needed_to_run):
            entry["status"] = f"written, not checked: {', '.join(missing)} not installed ({INSTALL_HINT})"
            log.warning("%s export %s", fmt, entry["status"])
            continue
        if fmt == "onnx":
            import onnxruntime

            runtimes.append(f"onnxruntime {onnxruntime.__version__} (CPU)")
        entry.update(compare(load(path), model, data.test))
        log.info(
            "%s export of the %s: %s, max |logit diff| %.3g, test acc %.4f (PyTorch %.4f)",
            fmt,
            name,
            entry["path"],
            entry["max_abs_diff"],
            entry["test_acc"],
            result["reference_test_acc"],
        )
    result["runtime"] = ", ".join(runtimes)
    return result


def export_run(run_dir: str | Path, role: str = "student") -> dict:
    """Export ``checkpoints/<role>.pt`` of a finished ``distill-run`` folder into ``RUN_DIR/export/``;
    add the result to its metrics.json and rewrite its report. The checkpoint (against its checksum)
    and metrics.json are checked before anything is written: a damaged one is one line, nothing exported."""
    from omegaconf import OmegaConf

    from distill_runner.build import build_data, build_model
    from distill_runner.reporting.report import write_report

    run_dir = Path(run_dir)
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(
            "RUN_DIR",
            str(run_dir),
            "not a distill-run folder (no .hydra/config.yaml); give a folder that distill-run wrote, e.g. "
            "outputs/<date>/<time>",
        )
    state = verified_checkpoint(run_dir, role)
    results = readable_metrics(run_dir, role)
    cfg = OmegaConf.load(config)
    data = build_data(cfg)
    node = cfg.teacher if role == "teacher" else cfg.student
    kwargs = {"weights": None} if role == "teacher" else {}  # the checkpoint holds all the weights
    model = build_model(node, role, data, cfg.seed, **kwargs)
    if role == "student":
        model = shipped_student(cfg, data, model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        fix = f"checkpoints/{role}.pt does not fit the model of its run's config ({str(exc).splitlines()[0]})"
        raise ConfigError("RUN_DIR", str(run_dir), fix) from None
    result = export_and_check(model, data, run_dir / "export", role)
    if results is not None:  # one export record per model: the teacher's does not replace the student's
        results.exports[role] = result
        overrides_path = run_dir / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_path)) if overrides_path.is_file() else []
        write_report(run_dir, results, overrides)
    return result


def shipped_student(cfg, data, student: nn.Module) -> nn.Module:
    """The student as its run shipped it: when the run's recipe changes that model (SimKD adds its projector and the
    teacher's head), the recipe bound to an untrained teacher of the run's architecture deploys it (the checkpoint
    holds all the weights)."""
    from distill_runner.build import bind_recipe, build_model, new_recipe

    recipe = new_recipe(cfg.distill)
    if not recipe.deploying_terms():
        return student
    teacher = build_model(cfg.teacher, "teacher", data, cfg.seed, weights=None)
    bind_recipe(recipe, student, teacher, data)
    return recipe.deployed(student)


def verified_checkpoint(run_dir: Path, role: str) -> dict:
    """``checkpoints/<role>.pt`` loaded through its checksum, or one line naming the file and the fix."""
    from distill_runner.io.storage import DamagedFile, load_verified

    checkpoint = run_dir / "checkpoints" / f"{role}.pt"
    if not checkpoint.is_file():
        raise ConfigError(
            "RUN_DIR", str(run_dir), f"has no checkpoints/{role}.pt; the run did not finish its {role} stage"
        )
    try:
        return load_verified(checkpoint)
    except DamagedFile as exc:
        fix = (
            f"{checkpoint} is damaged ({exc.reason}), nothing was exported; run the run's distill-run command "
            f"again with trainer.resume={run_dir} (a damaged stage is trained, or a cached model linked, again)"
        )
        raise ConfigError("RUN_DIR", str(run_dir), fix) from None


def readable_metrics(run_dir: Path, role: str):
    """The run's metrics.json (None when the run wrote none), read before anything is written: it must
    load and name the model exported; else one line naming the file."""
    from distill_runner.reporting.results import RunResults

    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        results = RunResults.load(path)
    except (ValueError, AttributeError) as exc:  # JSON that is not a results object
        fix = f"cannot read it ({type(exc).__name__}: {exc}); re-run the experiment to rewrite it"
        raise ConfigError("RUN_DIR", str(path), fix) from None
    if role not in results.models:
        fix = f"names no {role} (models: {', '.join(results.models) or 'none'}); export one of those: --model NAME"
        raise ConfigError("RUN_DIR", str(path), fix)
    return results


def main(argv: list[str] | None = None) -> int:
    """``distill-export RUN_DIR``: the console script."""
    parser = argparse.ArgumentParser(
        prog="distill-export",
        description="Export a finished distill-run's model as ONNX and TorchScript into RUN_DIR/export/, run the "
        "test split "
        "through the exported files and add the largest logit difference and the accuracy after export to "
        "metrics.json and report.md.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run folder written by distill-run, e.g. outputs/2026-11-23/10-44-50"
    )
    parser.add_argument(
        "--model",
        choices=("student", "baseline", "teacher"),
        default="student",
        help="which checkpoint to export (default: student, the KD student)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="distill-export: %(levelname)s: %(message)s")
    try:
        result = export_run(args.run_dir, args.model)
    except UserError as exc:  # ConfigError, StorageError
        print(f"distill-export: error: {exc}", file=sys.stderr)
        return 2
    from distill_runner.reporting.report import export_line

    print(export_line(result))
    for fmt in ("onnx", "torchscript"):
        if result.get(fmt, {}).get("path"):
            print(f"  {Path(args.run_dir) / result[fmt]['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
