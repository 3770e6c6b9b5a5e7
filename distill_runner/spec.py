"""The typed configuration: every key ``conf/`` holds, declared once beside its type, check, fix, help and
the cached artefacts it affects (the mechanism and why it is plain dataclasses: :mod:`distill_runner.schema`).

``RunSpec`` is the whole distill-run config; ``SearchSpec`` distill-search's ``search`` node. Group options
whose keys differ by ``_target_`` (data sets, models, optimizers, recipes) declare what the runner reads and
pass the rest to their factory, which checks its own keywords (an unknown one is one line).
:func:`reference` lists every key for the documentation.

Docs: docs/reference/configuration.md
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distill_runner.precision import PRECISIONS
from distill_runner.schema import (
    REQUIRED,
    Affects,
    Key,
    Spec,
    is_bool,
    is_int,
    is_number,
    is_text,
    key,
    node,
    nullable,
    number_in,
    one_of,
    parse,
)
from distill_runner.schema import reference as _reference
from distill_runner.search_spec import SearchSpec

DATA, TEACHER, BASELINE, OUTPUTS = Affects.DATA, Affects.TEACHER, Affects.BASELINE, Affects.OUTPUTS
EVAL, SPEED, RUN, NOTHING = Affects.EVAL, Affects.SPEED, Affects.RUN, Affects.NOTHING
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SPEED_MODES = ("cached", "measure")
TRAINED = TEACHER | BASELINE  # how every fine-tuned teacher and the baseline are trained
BOOL = "use true or false"

BALANCE = ("none", "weighted_sampler", "class_weights")  # dataset.balance (data.bundle reads it from here)


def _is_crop_scale(v) -> bool:
    return v is None or (
        isinstance(v, Sequence)
        and not isinstance(v, str)
        and len(v) == 2
        and all(map(is_number, v))
        and 0 < v[0] <= v[1] <= 1
    )


def _is_file(v) -> bool:
    return v is None or Path(str(v)).expanduser().is_file()


def _is_arch(v) -> bool:
    import torchvision

    return v is None or v in torchvision.models.list_models(module=torchvision.models)


_is_crop_scale.text = "null or [lo, hi], 0 < lo <= hi <= 1"
_is_file.text = "null or a path of a file"
_is_arch.text = "a torchvision classification model"
_CHECKPOINT_FIX = "no such file; give the path of a saved state_dict, training checkpoint or .safetensors file, or null"


spec = dataclass(kw_only=True)  # every node: keyword-only fields, so a required key may follow a default one


@spec
class ModelSpec(Spec):
    """A model factory's node (``_target_`` and its keywords)."""

    EXTRA = NOTHING  # the factory's own keywords: the node is one input, with its owner's affects
    _target_: str = key(REQUIRED, is_text, lambda k: f"pick one: {_top(k)}=<name> (see conf/{_top(k)}/)",
                        "the model factory")  # fmt: skip
    arch: str | None = key(None, _is_arch, lambda k: "not a torchvision classification model; e.g. resnet18, "
                           f"mobilenet_v2, mobilenet_v3_small, or pick a config: {k.rsplit('.', 2)[0]}=<name>",
                           "torchvision architecture (torchvision_model only)")  # fmt: skip


def _top(k: str) -> str:
    return k.split(".")[0]


@spec
class OptimizerSpec(Spec):
    """A ``torch.optim`` optimizer, built partially (the parameters come later)."""

    EXTRA = NOTHING
    lr: float | None = key(None, number_in(0, low_open=True), lambda k: f"use a learning rate > 0, e.g. {k}=1e-3",
                           "learning rate")  # fmt: skip
    weight_decay: float | None = key(None, number_in(0), lambda k: f"use a number >= 0, e.g. {k}=1e-4", "weight decay")
    momentum: float | None = key(None, number_in(0, 1), lambda k: f"use a momentum in [0, 1], e.g. {k}=0.9",
                                 "momentum (torch.optim.SGD; DOT: the mean of its two momenta)")  # fmt: skip
    delta: float | None = key(None, number_in(0, 0.5), lambda k: f"use a number in [0, 0.5], e.g. {k}=0.075 (DOT's)",
                              "DOT (trainer/optimizer=dot): task momentum = momentum - delta, distillation "
                              "momentum = momentum + delta")  # fmt: skip


@spec
class SchedulerSpec(Spec):
    """A learning-rate schedule (``distill_runner.train.engine`` factories)."""

    EXTRA = NOTHING
    warmup_epochs: float = key(0, None, "", "linear warm-up epochs, in [0, the stage's epochs]")


@spec
class TeacherSpec(Spec):
    """A teacher (``teacher`` and each ``distill.teachers.<name>``): its keys determine that teacher alone."""

    name: str | None = key(None, None, "", "the config's name (shown, never a result)", NOTHING)
    model: ModelSpec = node(ModelSpec, "the architecture", TEACHER)
    weights: str | None = key(REQUIRED, nullable(lambda v: isinstance(v, str)),
                              "use null or a weights name: torchvision's (teacher.weights=IMAGENET1K_V1) or a timm tag "
                              "(a1_in1k)", "pretrained weights, fetched before fine-tuning", TEACHER)  # fmt: skip
    checkpoint: str | None = key(REQUIRED, _is_file, _CHECKPOINT_FIX, "a file of weights loaded after `weights`",
                                 TEACHER, file=True)  # fmt: skip
    epochs: int = key(REQUIRED, number_in(0, integer=True),
                      "use an integer >= 0 (0 = use the teacher as loaded), e.g. teacher.epochs=3",
                      "fine-tuning epochs; 0 = use the teacher as loaded", TEACHER)  # fmt: skip
    optimizer: OptimizerSpec = node(OptimizerSpec, "the fine-tune's optimizer", TEACHER)
    scheduler: SchedulerSpec = node(SchedulerSpec, "the fine-tune's schedule", TEACHER)
    label_smoothing: float = key(0.0, number_in(0, 1, high_open=True),
                                 lambda k: f"use a number in [0, 1), e.g. {k}=0.1 (0: plain cross-entropy)",
                                 "label smoothing of the fine-tune's cross-entropy (0: none)", TEACHER)  # fmt: skip
    benchmark_lr: float | None = key(None, None, "", "the CIFAR-100 protocol's learning rate for this model (reaches "
                                     "results only through an optimizer.lr that interpolates it)", RUN)  # fmt: skip


@spec
class StudentSpec(Spec):
    """The student: the KD student and the scratch baseline start from the same weights."""

    name: str | None = key(None, None, "", "the config's name (shown, never a result)", NOTHING)
    model: ModelSpec = node(ModelSpec, "the architecture", BASELINE)
    checkpoint: str | None = key(
        None,
        _is_file,
        _CHECKPOINT_FIX,
        "a file of weights the KD student and the baseline start from",
        BASELINE,
        file=True,
    )
    benchmark_lr: float | None = key(
        None,
        None,
        "",
        "the CIFAR-100 protocol's learning rate for this model (reaches "
        "results only through trainer.optimizer.lr, which interpolates it)",
        RUN,
    )


@spec
class DatasetSpec(Spec):
    """A data set factory's node. Keys of a factory of the user's own pass through and enter the data key."""

    EXTRA = DATA
    _target_: str = key(REQUIRED, lambda v: isinstance(v, str), "pick a data set: dataset=digits",
                        "the data set factory", DATA)  # fmt: skip
    variant: str | None = key(None, None, "", "which of the factory's data sets (cifar10 | cifar100)", DATA)
    name: str | None = key(None, None, "", "the data set's name in logs and reports", NOTHING)
    root: str | None = key(
        None,
        nullable(lambda v: isinstance(v, str)),
        "use a folder path, e.g. dataset.root=data/chest_xray",
        "where the data is",
        DATA,
    )
    download: bool = key(False, is_bool, BOOL, "fetch the data when missing", NOTHING)
    image_size: int | None = key(None, number_in(8, integer=True), "use an integer >= 8, e.g. dataset.image_size=32",
                                 "images are resized to image_size x image_size", DATA | SPEED)  # fmt: skip
    batch_size: int = key(REQUIRED, number_in(1, integer=True), "use a positive integer, e.g. dataset.batch_size=64",
                          "training batch size", DATA)  # fmt: skip
    # EVAL, SPEED: what it determines; DATA: the data key has always held it (a factory keyword like any other)
    eval_batch_size: int | None = key(None, number_in(1, integer=True),
                                      "use a positive integer, e.g. dataset.eval_batch_size=256",
                                      "evaluation batch size", DATA | EVAL | SPEED)  # fmt: skip
    val_fraction: float | None = key(None, None, "", "the stratified validation fraction (digits)", DATA)
    test_fraction: float | None = key(None, None, "", "the stratified test fraction (one-folder layouts)", DATA)
    val_from_train: float | None = key(
        None,
        nullable(number_in(0, 1, high_open=True)),
        "use null or a fraction in [0, 1), e.g. dataset.val_from_train=0.1",
        "carve the val split from train (0: CIFAR validates on test)",
        DATA,
    )
    limit: int | None = key(None, nullable(number_in(1, integer=True)), "use null or a positive integer",
                            "keep only N images per split (smoke tests)", DATA)  # fmt: skip
    crop_padding: int | None = key(None, None, "", "training: random crop with this padding", DATA)
    hflip: bool | None = key(None, None, "", "training: random horizontal flip", DATA)
    resized_crop_scale: list | None = key(None, _is_crop_scale, "use null or [lo, hi] with 0 < lo <= hi <= 1, e.g. "
                                          "dataset.resized_crop_scale=[0.8,1.0]", "training: random resized crop, "
                                          "area fraction [lo, hi]", DATA)  # fmt: skip
    balance: str = key("none", one_of(*BALANCE), f"use one of {', '.join(BALANCE)}", "class-imbalance handling", DATA)
    on_bad_image: str = key("skip", one_of("skip", "error"), "use skip (skip unreadable images with a warning) or "
                            "error", "what an unreadable image does", DATA)  # fmt: skip
    mean: list | None = key(None, None, "", "normalization mean per channel", DATA)
    std: list | None = key(None, None, "", "normalization std per channel", DATA)
    decode_cache: bool = key(False, is_bool, "use true or false (normally set through data.decode_cache)",
                             "decode once into the store (normally ${data.decode_cache})", DATA)  # fmt: skip
    store_dir: str | None = key(None, is_text, "give a folder, e.g. dataset.store_dir=outputs/cache/decoded",
                                "the decoded-image store", NOTHING)  # fmt: skip
    progress: bool = key(False, None, "", "the store's progress bar", NOTHING)
    num_workers: int | str = key("auto", lambda v: v == "auto" or (is_int(v) and v >= 0),
                                 "use auto or an integer >= 0 (0 = load in the main process)",
                                 "DataLoader workers of the PIL loader", NOTHING)  # fmt: skip
    pin_memory: bool | str = key("auto", lambda v: v == "auto" or is_bool(v), "use auto, true or false",
                                 "pinned host memory", NOTHING)  # fmt: skip
    device: str | None = key(None, None, "", "picks the loader settings (normally ${trainer.device})", NOTHING)


@spec
class TrainerSpec(Spec):
    """The students' schedule (the KD student and the scratch baseline share it) and the hardware."""

    epochs: int = key(REQUIRED, number_in(1, integer=True), "use an integer >= 1, e.g. trainer.epochs=10",
                      "the students' epochs", BASELINE)  # fmt: skip
    device: str = key(REQUIRED, lambda v: bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(v))),
                      "use auto, cpu, cuda or cuda:N", "auto | cpu | cuda | cuda:N", NOTHING)  # fmt: skip
    precision: str = key(REQUIRED, lambda v: str(v) in PRECISIONS, f"use one of {', '.join(PRECISIONS)}",
                         "32 | 16-mixed (CUDA) | bf16-mixed", TRAINED | OUTPUTS)  # fmt: skip
    progress: bool = key(REQUIRED, is_bool, BOOL, "tqdm bars", NOTHING)
    resume: bool | str = key(False, lambda v: isinstance(v, (bool, str)),
                             "use false, true (the newest unfinished run with these overrides), auto (this run folder: "
                             "continue it if it holds checkpoints, else start) or a run folder",
                             "continue an unfinished run", NOTHING)  # fmt: skip
    channels_last: bool = key(False, is_bool, BOOL, "NHWC memory format for the trained models", TRAINED | SPEED)
    compile: bool | str = key(False, lambda v: is_bool(v) or v in COMPILE_MODES,
                              f"use false, true or a torch.compile mode: {', '.join(COMPILE_MODES)}",
                              "torch.compile the trained models: true or a mode", TRAINED | SPEED)  # fmt: skip
    optimizer: OptimizerSpec = node(OptimizerSpec, "the students' optimizer", BASELINE)
    scheduler: SchedulerSpec = node(SchedulerSpec, "the students' schedule", BASELINE)


@spec
class EvalSpec(Spec):
    """The end-of-run evaluation (teacher, KD student, baseline on the test split)."""

    latency_budget_s: float = key(0.5, number_in(0, low_open=True),
                                  "use a number of seconds > 0, e.g. eval.latency_budget_s=0.5",
                                  "seconds of timed batch-1 runs per model", EVAL | SPEED)  # fmt: skip
    latency_threads: int = key(1, number_in(1, integer=True), "use a whole number of threads >= 1, as the deployment "
                               "runs the model, e.g. eval.latency_threads=1", "torch threads while timing latency",
                               SPEED)  # fmt: skip
    throughput_budget_s: float = key(2.0, number_in(0, low_open=True),
                                     "use a number of seconds > 0, e.g. eval.throughput_budget_s=2",
                                     "seconds of timed batches per model", EVAL | SPEED)  # fmt: skip
    speed: str = key("cached", one_of(*SPEED_MODES), f"use one of {', '.join(SPEED_MODES)}",
                     "cached: reuse a timing session of the same models on this host; measure: time every run",
                     NOTHING)  # fmt: skip
    cka_samples: int = key(2048, number_in(2, integer=True), "use an integer >= 2, e.g. eval.cka_samples=2048",
                           "test images whose features enter linear CKA", EVAL)  # fmt: skip
    test_every_epoch: bool = key(False, is_bool, BOOL, "also measure test accuracy after each epoch", TRAINED)


@spec
class DataSpec(Spec):
    """How images reach the model (``dataset`` is which data)."""

    decode_cache: bool = key(True, is_bool, "use true (decode ImageFolder images once into a store under cache.dir) "
                             "or false (PIL every epoch)", "decode ImageFolder images once into a store",
                             NOTHING)  # fmt: skip
    on_device: bool | str = key("auto", lambda v: v == "auto" or is_bool(v), "use auto, true (the whole training "
                                "set as one tensor on the training device) or false (batches copied per step)",
                                "hold the training set on the training device", NOTHING)  # fmt: skip


@spec
class CacheSpec(Spec):
    """Shared between runs and sweep jobs: fine-tuned teachers, baselines and their replayable outputs."""

    enabled: bool = key(REQUIRED, is_bool, BOOL, "use the cache", NOTHING)
    dir: str = key(REQUIRED, is_text, "give a folder, e.g. cache.dir=outputs/cache", "the cache folder", NOTHING)
    shared: bool = key(False, is_bool, BOOL, "a cache shared on purpose (else it must be yours alone)", NOTHING)
    teacher_outputs_dtype: str = key(REQUIRED, one_of("float16", "bfloat16", "float32"),
                                     "use float16, bfloat16 or float32", "storage of cached teacher logits",
                                     OUTPUTS)  # fmt: skip
    max_teacher_outputs_mb: float = key(REQUIRED, number_in(0), "use a size in MB >= 0 (0 = never cache teacher "
                                        "outputs)", "above this, cached teacher outputs fall back to online",
                                        NOTHING)  # fmt: skip


@spec
class DistillSpec(Spec):
    """The recipe (its own keys are checked by :class:`~distill_runner.distill.Recipe` and its terms) and
    where its teacher signal comes from."""

    EXTRA = RUN  # temperature, alpha, terms, schedule, ...: the recipe's, this run's own results
    _target_: str = key(REQUIRED, lambda v: isinstance(v, str), "pick a recipe: distill=kd", "the recipe", RUN)
    teacher_outputs: str = key(
        "cached",
        one_of("cached", "online"),
        "use cached (replay the teacher's logits) or online (run the teacher every batch)",
        "cached: replay the frozen teacher's outputs; online: run it every batch",
        RUN,
    )
    teacher_weights: dict | None = key(None, None, "", "null = average the teachers; or a weight per teacher",
                                       OUTPUTS)  # fmt: skip
    teachers: dict[str, TeacherSpec] = node(TeacherSpec, "more teachers (multi-teacher recipes)", required=False,
                                            many=True)  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        self.weights: list[float] | None = None  # teacher_weights in teacher order (teacher first); None = average


@spec
class RunSpec(Spec):
    """The whole distill-run config (distill-search's adds ``search``). Validation (:func:`distill_runner.config.
    validate`) also hands over what it built: ``recipe`` (not bound yet)."""

    seed: int = key(
        REQUIRED,
        number_in(0, 2**32, high_open=True, integer=True),
        "use an integer in [0, 2^32), e.g. seed=0",
        "the run's seed: data split, order, weights",
        DATA,
    )
    data: DataSpec = node(DataSpec, "how images reach the model", required=False)  # before dataset: it interpolates
    dataset: DatasetSpec = node(DatasetSpec, "which data (conf/dataset/)")
    teacher: TeacherSpec = node(TeacherSpec, "the teacher (conf/teacher/)")
    student: StudentSpec = node(StudentSpec, "the student (conf/student/)")
    distill: DistillSpec = node(DistillSpec, "the recipe (conf/distill/)")
    trainer: TrainerSpec = node(TrainerSpec, "the students' schedule and the hardware (conf/trainer/)")
    eval: EvalSpec = node(EvalSpec, "the end-of-run evaluation", required=False)
    cache: CacheSpec = node(CacheSpec, "the shared cache")
    reference_teacher: bool | str = key("auto", one_of("auto", True, False), "use auto, true or false",
                                        "a recipe without a teacher: auto | true (fine-tune one to compare) | false",
                                        RUN)  # fmt: skip
    export: str | None = key(
        None,
        one_of(None, "onnx"),
        "use null (no export) or onnx (ONNX + TorchScript of the KD student, checked on the test split)",
        "onnx: also export the KD student",
        RUN,
    )
    hydra: dict = node(None, "Hydra's own settings (run folder, launcher, callbacks)", NOTHING, required=False)
    search: SearchSpec = node(SearchSpec, "distill-search's node (conf/search/)", NOTHING, required=False)

    def __post_init__(self):
        super().__post_init__()
        self.recipe = None  # the Recipe validation built, not bound yet (distill_runner.config.validate)


def typed(cfg) -> RunSpec:
    """``cfg`` as a :class:`RunSpec`: a spec as it is; a composed config (a script's, a test's) read against the
    schema (the runner validates with :func:`distill_runner.config.validate`, which also checks across keys)."""
    return cfg if isinstance(cfg, RunSpec) else parse(RunSpec, cfg)


def reference() -> list[Key]:
    """Every declared key of distill-run and distill-search: path, type, default, check, help, affects."""
    return list(_reference(RunSpec))
