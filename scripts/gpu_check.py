"""The GPU acceptance matrix: one command, one table, a non-zero exit on any failure.

    bash scripts/gpu_check.sh              # the acceptance schedule (the quickstart's own epochs)
    bash scripts/gpu_check.sh --quick      # 1 teacher epoch, 2 student epochs, the benches' --quick
    bash scripts/gpu_check.sh --dry-run    # print the commands, run nothing (works without CUDA)
    bash scripts/gpu_check.sh --only quickstart,bench-kd --out /tmp/gc

Rows, each a subprocess with its own run folder and (cold) cache folder under ``--out``
(default ``outputs/gpu_check/<timestamp>``), its output in ``<out>/logs/<row>.log``:

    quickstart-32, -16-mixed, -bf16-mixed      the quickstart on CUDA in each precision
    quickstart-32-channels_last-compile        the same with trainer.channels_last and trainer.compile
    sweep-2x2                                  distill-run -m over 2 temperatures x 2 alphas (summary.csv)
    xray_kd-224px-on_device                    experiment=xray_kd on a generated 2-class ImageFolder of
                                               256x256 JPEG/PNG files, 224 px, data.on_device=true (ImageNet
                                               teacher weights when torch's cache has them: --imagenet)
    bench-kd, bench-speed                      scripts/bench.py --only kd / --only speed on CUDA
    torchrun-nccl                              2 processes with NCCL (only with >= 2 GPUs)

A row fails when its command exits non-zero or times out, when the run did not use CUDA or the
precision asked for, when a model's test accuracy is below the floor (acceptance schedule, digits
rows), or when what the row exists to show is missing (data held on the device, the sweep's teacher
reused by its later jobs, NCCL with 2 processes). Exit codes: 0 every row ok (or skipped),
1 a row failed, 2 bad arguments, 77 no CUDA device (skipped: CI must not count it as a pass).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAIL, EXIT_NO_CUDA = 0, 1, 77
NO_CUDA = (
    "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check; "
    "run it on a machine with an NVIDIA GPU"
)
COMMON = ["trainer.device=cuda", "trainer.progress=false"]
QUICK = ["teacher.epochs=1", "trainer.epochs=2", "eval.latency_budget_s=0.1", "eval.throughput_budget_s=0.5"]
SWEEP = ["distill.temperature=1,4", "distill.alpha=0.25,0.75"]
ACC_FLOOR = 0.85  # acceptance schedule, digits rows; the README's quickstart scores 0.986-0.997
XRAY_CLASSES = ("NORMAL", "PNEUMONIA")
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1, what xray_kd loads


@dataclass
class Row:
    name: str
    kind: str  # run | sweep | torchrun | bench
    argv: list[str]
    overrides: list[str] = field(default_factory=list)  # the distill-run overrides (a sweep's values comma-separated)
    precision: str | None = None  # the precision the run must report
    floor: float | None = None  # every model's test accuracy must reach it
    expect_log: str | None = None  # text the row's output must contain
    run_dir: Path | None = None  # hydra.run.dir, or hydra.sweep.dir for a sweep
    skip: str | None = None
    note: str = ""

    def jobs(self) -> list[list[str]]:
        """The config overrides of each job (hydra.* left out, a sweep expanded): what tests compose."""
        fixed = [o for o in self.overrides if o != "-m" and not o.startswith("hydra.")]
        if self.kind != "sweep":
            return [fixed]
        swept = [o for o in fixed if o in SWEEP]
        rest = [o for o in fixed if o not in SWEEP]
        choices = [[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in swept]
        return [rest + list(combo) for combo in itertools.product(*choices)]


@dataclass
class Result:
    name: str
    status: str  # ok | FAIL | skip
    wall_s: float | None = None
    teacher: float | str | None = None
    student: float | str | None = None
    baseline: float | str | None = None
    precision: str = ""
    images_per_s: float | None = None
    detail: str = ""


def matrix(out: Path, quick: bool, gpus: int, imagenet: bool, python: str = sys.executable) -> list[Row]:
    """The rows, in the order they run. ``gpus``: CUDA devices seen (torchrun needs 2)."""
    schedule = QUICK if quick else []
    floor = None if quick else ACC_FLOOR
    distill_run = [python, "-m", "distill_runner"]

    def folders(name: str) -> list[str]:
        return [f"hydra.run.dir={out / name}", f"cache.dir={out / 'cache' / name}"]

    rows = []
    for precision, speed in (("32", []), ("16-mixed", []), ("bf16-mixed", []), ("32", ["channels_last", "compile"])):
        name = "-".join(["quickstart", precision, *speed])
        overrides = [*COMMON, f"trainer.precision={precision}", *[f"trainer.{s}=true" for s in speed], *schedule]
        overrides += folders(name)
        rows.append(Row(name, "run", distill_run + overrides, overrides, precision, floor, run_dir=out / name))
    name = "sweep-2x2"
    overrides = ["-m", *SWEEP, *COMMON, *schedule, f"hydra.sweep.dir={out / name}", f"cache.dir={out / 'cache' / name}"]
    rows.append(Row(name, "sweep", distill_run + overrides, overrides, "32", floor, run_dir=out / name))

    name = "xray_kd-224px-on_device"
    weights = "IMAGENET1K_V1" if imagenet else "null"
    overrides = ["experiment=xray_kd", f"dataset.root={out / 'data' / 'chest_xray'}", "dataset.image_size=224"]
    overrides += ["data.on_device=true", f"teacher.weights={weights}", *COMMON, *schedule, *folders(name)]
    note = "" if imagenet else "teacher.weights=null: no ImageNet ResNet-18 weights on this machine (--imagenet)"
    rows.append(Row(name, "run", distill_run + overrides, overrides, "32", None, "held on cuda", out / name, note=note))

    for section in ("kd", "speed"):
        argv = [python, str(ROOT / "scripts" / "bench.py"), "--only", section] + (["--quick"] if quick else [])
        rows.append(Row(f"bench-{section}", "bench", argv))

    name = "torchrun-nccl"
    overrides = [*COMMON, *schedule, *folders(name)]
    argv = [python, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "distill_runner", *overrides]
    skip = None if gpus >= 2 else f"skipped, {gpus} GPU{'' if gpus == 1 else 's'}"
    rows.append(Row(name, "torchrun", argv, overrides, "32", floor, "backend nccl", out / name, skip))
    return rows


def make_xray_folder(root: Path, quick: bool, size: int = 256, seed: int = 0) -> Path:
    """``root/{train,val,test}/{NORMAL,PNEUMONIA}``: grayscale JPEGs (every 5th a PNG) of ``size`` px whose
    brightness and a bright disc depend on the class, so the teacher and the student can learn them."""
    import numpy as np
    from PIL import Image

    counts = {"train": 24, "val": 2, "test": 8} if quick else {"train": 64, "val": 4, "test": 16}
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, n in counts.items():
        for c, cls in enumerate(XRAY_CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.normal(70 + 90 * c, 30, (size, size))
                cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] += 60 * c
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
                image.save(folder / f"{split}-{cls}-{i}.{'png' if i % 5 == 4 else 'jpeg'}")
    return root


def reason(output: str) -> str:
    """The one line that says why a command failed: distill-run's own error line, else the last
    exception line (not torchrun's ChildFailedError wrapper), else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in (r"^distill-run: error: ", r"^[\w.]*(Error|Exception)\b(?<!ChildFailedError)"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1]
    return lines[-1] if lines else "no output"


def _acc(metrics: dict, role: str) -> float | None:
    return (metrics.get("models", {}).get(role) or {}).get("test_acc")


def _train_images_per_s(metrics: dict, stage: str = "student") -> float | None:
    """Training images/s of a stage: train images / median epoch time (epochs after the first, which
    compiles and warms up; validation included)."""
    history = (metrics.get("stages", {}).get(stage) or {}).get("history") or []
    times = [h["epoch_time_s"] for h in history if h.get("epoch_time_s")]
    times = times[1:] or times
    train = sum(metrics.get("class_counts", {}).get("train", []))
    return train / statistics.median(times) if times and train else None


def check_metrics(row: Row, metrics: dict) -> list[str]:
    """What is wrong with a finished run's metrics.json (empty: nothing)."""
    problems = []
    if not str(metrics.get("device", "")).startswith("cuda"):
        problems.append(f"ran on {metrics.get('device')}, not CUDA")
    if row.precision and metrics.get("precision") != row.precision:
        problems.append(f"precision {metrics.get('precision')}, asked {row.precision}")
    for role in ("teacher", "student", "baseline"):
        acc = _acc(metrics, role)
        if acc is None:
            problems.append(f"no {role} test accuracy")
        elif row.floor is not None and acc < row.floor:
            problems.append(f"{role} test acc {acc:.4f} < {row.floor}")
    if row.kind == "torchrun" and metrics.get("processes") != 2:
        problems.append(f"{metrics.get('processes')} process(es), expected 2")
    return problems


def judge(row: Row, output: str) -> Result:
    """The row's result from its finished command's output and files."""
    res = Result(row.name, "ok", precision=row.precision or "")
    problems = []
    if row.expect_log and row.expect_log not in output:
        problems.append(f"the output never says '{row.expect_log}'")
    if row.kind in ("run", "torchrun"):
        path = row.run_dir / "metrics.json"
        if not path.is_file():
            return Result(row.name, "FAIL", detail=f"no {path}")
        metrics = json.loads(path.read_text())
        problems += check_metrics(row, metrics)
        res.teacher, res.student, res.baseline = (_acc(metrics, r) for r in ("teacher", "student", "baseline"))
        res.precision, res.images_per_s = metrics.get("precision", ""), _train_images_per_s(metrics)
    elif row.kind == "sweep":
        problems += judge_sweep(row, res)
    else:
        judge_bench(row, output, res, problems)
    if problems:
        res.status, res.detail = "FAIL", "; ".join(problems)
    else:
        res.detail = "; ".join(filter(None, [res.detail, row.note]))
    return res


def judge_sweep(row: Row, res: Result) -> list[str]:
    summary = row.run_dir / "summary.csv"
    if not summary.is_file():
        return [f"no {summary}"]
    with open(summary, newline="") as f:
        rows = list(csv.DictReader(f))
    jobs = sorted(row.run_dir.glob("*/metrics.json"), key=lambda p: int(p.parent.name))
    problems = [] if len(rows) == len(jobs) == 4 else [f"summary.csv has {len(rows)} rows, {len(jobs)} jobs, not 4"]
    metrics = [json.loads(p.read_text()) for p in jobs]
    for i, m in enumerate(metrics):
        problems += [f"job {i}: {p}" for p in check_metrics(row, m)]
        if i > 0 and not m.get("stages", {}).get("teacher", {}).get("reused"):
            problems.append(f"job {i} fine-tuned the teacher again instead of reusing job 0's")

    def spread(column: str) -> str | None:
        values = sorted(float(r[column]) for r in rows if r.get(column) not in (None, "", "nan"))
        return (
            None
            if not values
            else f"{values[0]:.4f}"
            if values[0] == values[-1]
            else f"{values[0]:.3f}-{values[-1]:.3f}"
        )

    res.teacher, res.student, res.baseline = spread("teacher_acc"), spread("student_acc"), spread("baseline_acc")
    res.precision = "/".join(sorted({str(m.get("precision")) for m in metrics})) or "?"
    speeds = [s for m in metrics if (s := _train_images_per_s(m))]
    res.images_per_s = statistics.median(speeds) if speeds else None
    res.detail = f"{len(rows)} jobs; student acc over the grid (min-max)"
    return problems


def judge_bench(row: Row, output: str, res: Result, problems: list[str]) -> None:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    try:
        data = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        problems.append("no JSON line at the end of the bench's output")
        return
    if not str(data.get("device", "")).startswith("cuda"):
        problems.append(f"bench ran on {data.get('device')}, not CUDA")
    if row.name == "bench-kd":
        res.precision = str(data.get("precision", ""))
        parts = []
        for size in ("32px", "224px"):
            d = data.get(size) or {}
            if not d:
                problems.append(f"no {size} figures")
                continue
            parts.append(
                f"{size}: replayed KD {d['cached_kd_images_per_s']:.0f} vs CE {d['ce_images_per_s']:.0f} img/s "
                f"(epoch x{d['cached_over_ce']:.2f}), online x{d['online_over_ce']:.2f}"
            )
        res.images_per_s = (data.get("224px") or {}).get("cached_kd_images_per_s")
        res.detail = "; ".join(parts)
    else:
        speed = data.get("speed") or {}
        base = speed.get("32")
        if not base:
            problems.append("no fp32 figures in the speed section")
            return
        res.precision = "/".join(k for k in ("32", "16-mixed", "bf16-mixed") if k in speed)
        res.images_per_s = base["student_images_per_s"]
        parts = []
        for name in ("16-mixed", "bf16-mixed"):
            if name not in speed:
                problems.append(f"no {name} figures")
                continue
            ratios = [
                f"{r} x{speed[name][f'{r}_images_per_s'] / base[f'{r}_images_per_s']:.2f}"
                for r in ("student", "teacher")
            ]
            parts.append(f"{name}/32: {', '.join(ratios)}")
        best = max(speed, key=lambda k: speed[k]["teacher_images_per_s"])
        res.detail = "; ".join(parts + [f"fastest teacher: {best}"])


def run_row(row: Row, log: Path, timeout: float) -> Result:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(row.argv)}\n")
        f.flush()
        # its own process group: a timeout or Ctrl-C stops torchrun's workers and compile workers too
        proc = subprocess.Popen(row.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Result(row.name, "FAIL", time.perf_counter() - start, detail=f"timed out after {timeout:.0f} s")
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    wall = time.perf_counter() - start
    output = log.read_text(errors="replace")
    if proc.returncode != 0:
        return Result(row.name, "FAIL", wall, detail=f"exit {proc.returncode}: {reason(output)[:300]}")
    try:
        res = judge(row, output)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        res = Result(row.name, "FAIL", detail=f"cannot read the row's results: {exc!r}")
    res.wall_s = wall
    return res


def format_table(results: list[Result]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if v <= 1.0 else f"{v:,.0f}"
        return str(v)

    head = ["row", "status", "wall s", "teacher acc", "student acc", "baseline acc", "precision", "student img/s"]
    body = [
        [r.name, r.status, "-" if r.wall_s is None else f"{r.wall_s:.0f}", cell(r.teacher), cell(r.student)]
        + [cell(r.baseline), r.precision or "-", "-" if r.images_per_s is None else f"{r.images_per_s:,.0f}"]
        for r in results
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    right = set(range(2, len(head))) - {6}
    line = lambda cols: "  ".join(
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths))
    )
    out = [line(head) + "  detail", "  ".join("-" * w for w in widths) + "  ------"]
    out += [line(cols) + (f"  {r.detail}" if r.detail else "") for cols, r in zip(body, results)]
    failed = sum(r.status == "FAIL" for r in results)
    out.append(f"{len(results)} rows: {failed} failed, {sum(r.status == 'skip' for r in results)} skipped")
    return "\n".join(out)


def exit_code(results: list[Result]) -> int:
    return EXIT_FAIL if any(r.status == "FAIL" for r in results) else EXIT_OK


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 teacher epoch, 2 student epochs, the benches' --quick")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing (no CUDA needed)")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/gpu_check/<timestamp>)")
    parser.add_argument("--only", help="comma-separated parts of row names: run only the rows that contain one")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row before it fails (default 1800)")
    parser.add_argument(
        "--imagenet",
        choices=("auto", "yes", "no"),
        default="auto",
        help="xray_kd's teacher.weights=IMAGENET1K_V1: auto = when the file is in torch.hub's cache (no download)",
    )
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or ROOT / "outputs" / "gpu_check" / stamp).resolve()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_FILE
    imagenet = args.imagenet == "yes" or (args.imagenet == "auto" and cached.is_file())
    rows = matrix(out, args.quick, gpus, imagenet)
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        rows = [r for r in rows if any(w in r.name for w in wanted)]
        if not rows:
            parser.error(f"--only {args.only}: no row name contains it")
    if not args.dry_run and not gpus:
        print(NO_CUDA, file=sys.stderr)
        return EXIT_NO_CUDA
    if args.dry_run:
        for row in rows:
            print(f"# {row.name}" + (f" ({row.skip})" if row.skip else ""))
            print(shlex.join(row.argv))
        return EXIT_OK
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    print(
        f"gpu_check: {gpus} GPU(s): {names}; torch {torch.__version__}; {len(rows)} rows; output in {out}", flush=True
    )
    if any(r.name.startswith("xray_kd") for r in rows):
        make_xray_folder(out / "data" / "chest_xray", args.quick)
    results = []
    for i, row in enumerate(rows, 1):
        if row.skip:
            results.append(Result(row.name, "skip", detail=row.skip))
        else:
            print(f"[{i}/{len(rows)}] {row.name}: {shlex.join(row.argv)}", flush=True)
            results.append(run_row(row, out / "logs" / f"{row.name}.log", args.timeout))
        r = results[-1]
        print(f"[{i}/{len(rows)}] {row.name}: {r.status}" + (f" ({r.wall_s:.0f} s)" if r.wall_s else ""), flush=True)
    print()
    print(format_table(results))
    print(f"logs: {out / 'logs'}")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
