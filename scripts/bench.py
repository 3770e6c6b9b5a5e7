"""What distillation costs compared with training the student alone, and what the data path costs.

Measures, with the runner's own training loop (``engine.fit``), one epoch of:
  - ce:      the student with cross-entropy only (the cost of training the student alone),
  - online:  Hinton KD with the teacher's forward pass on every batch (the plain PyTorch loop),
  - cached:  Hinton KD replaying precomputed teacher logits (``distill.teacher_outputs=cached``),
and the teacher's inference images/s, at 32 px (small-image ResNet-18 stem) and 224 px (ImageNet
stem), on synthetic tensors, plus the same three epochs on the quickstart's digits data.

The ``feature`` section does the same for ``distill=feature`` (FitNets hints) and ``distill=attention``
(features.0->layer2, features.1->layer3, + CE) on the quickstart's digits: CE alone, the recipe with the
online teacher, and replaying what ``distill.teacher_outputs=cached`` stores for it (float16 feature maps
for hints, attention maps for attention transfer); ``lookup_over_ce`` is the lookups' own share.

The ``recipes`` section (:mod:`bench_recipes`) does the same for every feature/relation recipe of conf/distill
(RKD, PKT, SP, CC, NST, FSP, KDSVD, ICKD, CRD, VID, ReviewKD, ..., found by globbing) on today's quickstart (16 px,
composed as the runner composes it, each recipe's own student): CE alone, online, replayed.

The ``sweep`` section (:mod:`bench_sweep`) runs the quickstart cold (empty cache) in this process, then
later jobs of a ``distill.temperature`` sweep, and reports each later job's wall time over training the
student alone (job 0's scratch baseline): ``later_over_student_alone``.

The ``speed`` section (:mod:`bench_speed`, on CUDA; ``--speed`` on a CPU) trains the student and
the teacher at 224 px per precision x channels_last x torch.compile configuration (images/s).

The ``data`` section (:mod:`bench_data`) generates X-ray-sized grayscale JPEGs once and compares, at
224 px, torchvision's ImageFolder + PIL transforms with a DataLoader against the decode-once store
+ tensor augmentation, alone and feeding the student's CE step, plus the store's build cost.

The ``prints`` section (:func:`bench_data.measure_print_cost`) times the data print that every cache key
holds: hashing 5,863 generated X-ray-sized JPEGs (~200 KB each, as many as the Kaggle chest X-ray set)
into an empty index (cold), then the next run's stat-only check (warm).

    python scripts/bench.py              # ~7 min on 2 CPU cores (the first run also generates 1,000 JPEGs)
    python scripts/bench.py --only data  # the data section alone (~4 min)
    python scripts/bench.py --only feature  # distill=feature/attention: replayed vs CE alone (~2 min)
    python scripts/bench.py --only recipes  # every feature/relation recipe: online and replayed vs CE alone
    python scripts/bench.py --only recipes --recipes rkd crd   # those recipes alone
    python scripts/bench.py --only sweep    # the quickstart cold, then 3 later jobs of a temperature sweep
    python scripts/bench.py --only prints   # the data print: cold (hash every file) and warm (stat only)
    python scripts/bench.py --quick      # fewer images, for a smoke test

The last line printed is one JSON object: for each image size, the images/s figures and the
epoch-time ratios ``cached_over_ce`` and ``online_over_ce`` (1.0 = as cheap as CE alone); under
``data``, the data-path figures and ``share_of_ce_epoch`` / ``speedup_vs_pil`` against the goals.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from distill_runner.data.bundle import Augment, DataBundle, TensorBatches
from distill_runner.data.digits import digits
from distill_runner.distill.recipe import Recipe
from distill_runner.distill.signals import OnlineTeacher, ReplayedTeacher, compute_teacher_outputs
from distill_runner.models.factories import count_parameters, tiny_cnn, torchvision_model
from distill_runner.train import engine

CPU_OR_GPU = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synthetic(image_size: int, n: int, batch_size: int, num_classes: int) -> TensorBatches:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, num_classes, (n,), generator=gen)
    return TensorBatches(
        images, targets, batch_size, [0.5] * 3, [0.25] * 3, shuffle=True, augment=Augment(crop_padding=4, hflip=True)
    )


def epoch_seconds(
    model_init: torch.nn.Module, recipe, teacher, train, device, precision, repeats: int, optimizer=None
) -> float:
    """Median wall time of one training epoch over ``repeats`` epochs (after one warm-up epoch); AdamW at 1e-3
    unless ``optimizer`` (params -> optimizer) is given."""
    times = []
    optimizer = optimizer or partial(torch.optim.AdamW, lr=1e-3)
    for i in range(repeats + 1):
        model = copy.deepcopy(model_init)
        stage = engine.Stage("bench", model, recipe, 1, optimizer, partial(engine.constant_lr), teacher=teacher)
        start = time.perf_counter()
        engine.fit(stage, train, [], device, precision, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def teacher_images_per_s(teacher: torch.nn.Module, train, device, precision) -> float:
    teacher.to(device).eval()
    for i, batch in enumerate(train):  # warm-up
        teacher(batch["image"].to(device))
        if i == 1:
            break
    start, n = time.perf_counter(), 0
    for batch in train:
        with precision.autocast():
            teacher(batch["image"].to(device))
        n += len(batch["target"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def measure(name: str, train, num_classes: int, image_size: int, device, precision, repeats: int) -> dict:
    torch.manual_seed(0)
    teacher = torchvision_model("resnet18", num_classes=num_classes, image_size=image_size).eval()
    student = tiny_cnn(num_classes=num_classes)
    online = OnlineTeacher(teacher)
    start = time.perf_counter()
    outputs = compute_teacher_outputs(
        online, train, views=1, device=device, precision=precision, dtype=torch.float16, progress=False
    )
    cached = ReplayedTeacher(outputs["logits"])
    build_s = time.perf_counter() - start
    kd = Recipe.hinton(temperature=4.0, alpha=0.5)
    n = train.num_samples
    ce_s = epoch_seconds(student, Recipe.cross_entropy(), None, train, device, precision, repeats)
    online_s = epoch_seconds(student, kd, online, train, device, precision, repeats)
    cached_s = epoch_seconds(student, kd, cached, train, device, precision, repeats)
    result = {
        "images": n,
        "teacher_params": count_parameters(teacher),
        "student_params": count_parameters(student),
        "teacher_forward_images_per_s": teacher_images_per_s(teacher, train, device, precision),
        "ce_images_per_s": n / ce_s,
        "online_kd_images_per_s": n / online_s,
        "cached_kd_images_per_s": n / cached_s,
        "teacher_outputs_build_s": build_s,
        "cached_over_ce": cached_s / ce_s,
        "online_over_ce": online_s / ce_s,
    }
    print(
        f"{name:<22} {image_size:>4}px  teacher fwd {result['teacher_forward_images_per_s']:8.0f}  CE "
        f"{result['ce_images_per_s']:8.0f}  "
        f"online KD {result['online_kd_images_per_s']:8.0f}  cached KD {result['cached_kd_images_per_s']:8.0f} "
        "images/s   "
        f"online/CE {result['online_over_ce']:5.2f}x  cached/CE {result['cached_over_ce']:5.2f}x",
        flush=True,
    )
    return result


PAIRS = ["features.0:layer2", "features.1:layer3"]
FEATURE_RECIPES = {  # the terms of conf/distill/feature.yaml and attention.yaml
    "feature": {"_target_": "distill_runner.distill.terms.FeatureHints", "pairs": PAIRS},
    "attention": {"_target_": "distill_runner.distill.terms.AttentionTransfer", "weight": 1000.0, "pairs": PAIRS},
}


def lookup_seconds(replayed: ReplayedTeacher, train) -> float:
    """One epoch of replayed lookups (index the stored views, to float32), less the loader's own time."""
    start = time.perf_counter()
    for _batch in train:
        pass
    loader_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in train:
        replayed(batch)
    return time.perf_counter() - start - loader_s


def measure_features(data: DataBundle, device, precision, repeats: int) -> dict:
    """distill=feature and distill=attention on ``data``: one epoch of CE alone, of each recipe with the
    online teacher and replaying its stored (float16) teacher summaries, in one run (ratios are comparable
    within it); ``lookup_over_ce``: the replay's own share (the rest is the term's own work: adapters, maps)."""
    torch.manual_seed(0)
    teacher = torchvision_model("resnet18", num_classes=data.num_classes, image_size=data.image_size).eval()
    student = tiny_cnn(num_classes=data.num_classes)
    train, n = data.train, data.train.num_samples
    ce_s = epoch_seconds(student, Recipe.cross_entropy(), None, train, device, precision, repeats)
    results = {"images": n, "ce_images_per_s": n / ce_s}
    for name, term in FEATURE_RECIPES.items():
        recipe = Recipe({"ce": {"_target_": "distill_runner.distill.terms.CrossEntropy"}, name: term})
        recipe.bind(student, teacher, data)
        online = OnlineTeacher(teacher, recipe.teacher_layers)
        start = time.perf_counter()
        outputs = compute_teacher_outputs(online, train, 1, device, precision, torch.float16, False, recipe.summarize)
        build_s = time.perf_counter() - start
        replayed = ReplayedTeacher(outputs["logits"], outputs["summaries"])
        stored = [outputs["logits"], *(v for layers in outputs["summaries"].values() for v in layers.values())]
        online_s = epoch_seconds(student, recipe, online, train, device, precision, repeats)
        replayed_s = epoch_seconds(student, recipe, replayed, train, device, precision, repeats)
        result = results[name] = {
            "stored_mb_per_augmented_epoch": sum(v.numel() * v.element_size() for v in stored) / 2**20,
            "teacher_outputs_build_s": build_s,
            "online_images_per_s": n / online_s,
            "replayed_images_per_s": n / replayed_s,
            "replayed_over_ce": replayed_s / ce_s,
            "online_over_ce": online_s / ce_s,
            "lookup_over_ce": lookup_seconds(replayed, train) / ce_s,
        }
        print(
            f"{name + ' (digits)':<22} {data.image_size:>4}px  CE {n / ce_s:8.0f}  online {n / online_s:8.0f}  "
            f"replayed {n / replayed_s:8.0f} images/s   online/CE {result['online_over_ce']:5.2f}x  replayed/CE "
            f"{result['replayed_over_ce']:5.2f}x (lookups {result['lookup_over_ce']:4.2f}x)  "
            f"{result['stored_mb_per_augmented_epoch']:.1f} MB stored per augmented epoch",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats (smoke test)")
    parser.add_argument("--precision", default="32", choices=engine.PRECISIONS)
    parser.add_argument(
        "--only",
        choices=("all", "kd", "feature", "recipes", "sweep", "data", "prints", "speed"),
        default="all",
        help="kd: the distillation epochs; feature: distill=feature's; recipes: every feature/relation recipe's; "
        "sweep: the quickstart cold and a sweep's later jobs; data: the data path; prints: the data print's cost; "
        "speed: GPU options",
    )
    parser.add_argument("--recipes", nargs="+", default=None, help="the recipes section's recipes (default: all)")
    parser.add_argument(
        "--speed", action="store_true", help="run the speed section (precision x channels_last x compile) on a CPU too"
    )
    parser.add_argument(
        "--data-dir", default="outputs/bench", help="where the generated JPEGs and the store go (kept between runs)"
    )
    parser.add_argument("--print-files", type=int, default=5863, help="JPEGs the prints section generates and hashes")
    args = parser.parse_args()
    device = CPU_OR_GPU
    precision = engine.resolve_precision(args.precision, device)
    repeats = 1 if args.quick else 3
    sizes = {32: 256 if args.quick else 1024, 224: 64 if args.quick else 192}
    print(
        f"device {device}, precision {precision.name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"images/s of one training epoch (median of {repeats}) with the runner's loop; ratios are epoch times over "
        "the CE-only epoch"
    )
    results = {
        "device": str(device),
        "precision": precision.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.only in ("all", "kd"):
        for size, n in sizes.items():
            results[f"{size}px"] = measure(
                "synthetic",
                synthetic(size, n, 32, 2 if size == 224 else 10),
                2 if size == 224 else 10,
                size,
                device,
                precision,
                repeats,
            )
        data: DataBundle = digits(image_size=32, batch_size=32, limit=256 if args.quick else None)
        results["quickstart_32px"] = measure(
            "quickstart (digits)", data.train, data.num_classes, 32, device, precision, repeats
        )
    if args.only in ("all", "feature"):
        # the quickstart's shift augmentation, as a sweep trains (the loader then yields channels_last images)
        data = digits(image_size=32, batch_size=32, limit=256 if args.quick else None, crop_padding=2)
        results["features_32px"] = measure_features(data, device, precision, repeats)
    if args.only in ("all", "recipes"):
        import bench_recipes  # scripts/ is on sys.path when this file runs as a script

        quick = ["dataset.limit=128"] if args.quick else []
        results["recipes_16px"] = bench_recipes.measure_recipes(args.recipes, quick, device, precision, repeats)
    if args.only in ("all", "sweep"):
        import bench_sweep  # scripts/ is on sys.path when this file runs as a script

        quick = ["teacher.epochs=1", "trainer.epochs=2", "dataset.limit=200"] if args.quick else []
        results["sweep"] = bench_sweep.measure_sweep([f"trainer.precision={precision.name}", *quick])
    if args.only in ("all", "data"):
        import bench_data  # scripts/ is on sys.path when this file runs as a script

        results["data"] = bench_data.measure_data_path(Path(args.data_dir), device, precision, quick=args.quick)
    if args.only in ("all", "prints"):
        import bench_data

        results["prints"] = bench_data.measure_print_cost(Path(args.data_dir), n=64 if args.quick else args.print_files)
    if args.only == "speed" or (args.only == "all" and (device.type == "cuda" or args.speed)):
        import bench_speed

        results["speed"] = bench_speed.speed_section(
            device, images=128 if args.quick else 2048, repeats=1 if args.quick else 3, compile_too=not args.quick
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
