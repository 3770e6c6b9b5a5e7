"""``search.int8=true``: the chosen student's ONNX file quantized to int8 by ONNX Runtime's static
quantization (QDQ, per-channel weights), calibrated on training images; its test accuracy, batch-1
latency and size beside the fp32 file's, both run by ONNX Runtime on the CPU.

Docs: docs/guide/search.md
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from distill_runner.evaluation.export import missing_modules, quiet
from distill_runner.spec import RunSpec

log = logging.getLogger(__name__)

INSTALL = "pip install -e '.[export]'"
LATENCY_RUNS = 50  # timed batch-1 runs per file, after 5 untimed ones


def quantize(onnx_path: Path | None, spec: RunSpec, out_dir: Path, calibration_images: int) -> dict:
    """Quantize ``onnx_path`` into ``out_dir/student.int8.onnx`` and measure both; a status when it cannot."""
    if missing := missing_modules("onnx", "onnxruntime"):
        status = f"skipped: {', '.join(missing)} not installed; {INSTALL} adds int8 quantization"
        log.warning("int8: %s", status)
        return {"status": status}
    if onnx_path is None or not onnx_path.is_file():
        status = "skipped: the student has no ONNX export (see the export entry)"
        log.warning("int8: %s", status)
        return {"status": status}
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quant_pre_process, quantize_static

    from distill_runner.build import build_data

    data = build_data(spec, torch.device("cpu"))
    batches = _calibration_batches(data.train, calibration_images)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(batches)

        def get_next(self):
            return next(({"image": b} for b in self.left), None)

    int8_path = out_dir / "student.int8.onnx"
    tmp, prepared = (int8_path.with_name(int8_path.name + s) for s in (".tmp", ".prepared.tmp"))
    with quiet("onnxruntime", "root"):  # onnxruntime.quantization logs through the root logger
        # ONNX Runtime's recommended pre-processing (shape inference, graph optimization) before quantizing
        quant_pre_process(str(onnx_path), str(prepared))
        quantize_static(prepared, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    prepared.unlink()
    tmp.replace(int8_path)  # atomic: a half-written file never has the final name
    shape = (1, data.in_channels, data.image_size, data.image_size)
    result = {"calibration_images": sum(len(b) for b in batches), "method": "onnxruntime quantize_static, QDQ, "
              "pre-processed, per-channel int8 weights, int8 activations, MinMax calibration"}  # fmt: skip
    for name, path in (("fp32", onnx_path), ("int8", int8_path)):
        session = _session(path)
        result[name] = {"path": f"{out_dir.name}/{path.name}", "size_bytes": path.stat().st_size,
                        "test_acc": _accuracy(session, data.test),
                        "latency_ms": _latency_ms(session, shape)}  # fmt: skip
    fp32, int8 = result["fp32"], result["int8"]
    log.info("int8: test acc %.4f (fp32 %.4f), batch-1 latency %.3f ms (fp32 %.3f ms), %s", int8["test_acc"],
             fp32["test_acc"], int8["latency_ms"], fp32["latency_ms"], int8_path)  # fmt: skip
    return result


def _calibration_batches(loader, limit: int) -> list[np.ndarray]:
    out, seen = [], 0
    for batch in loader:
        images = batch["image"][: limit - seen].float().cpu().numpy()
        out.append(images)
        seen += len(images)
        if seen >= limit:
            break
    return out


def _session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as the PyTorch measurements use
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _accuracy(session, loader) -> float:
    correct = n = 0
    for batch in loader:
        logits = session.run(None, {"image": batch["image"].float().cpu().numpy()})[0]
        correct += int((logits.argmax(1) == batch["target"].numpy()).sum())
        n += len(batch["target"])
    return correct / n if n else float("nan")


def _latency_ms(session, shape: tuple[int, ...]) -> float:
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for _ in range(5):
        session.run(None, {"image": x})
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
