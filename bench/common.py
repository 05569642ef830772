"""Shared helpers of the benchmark scripts: device description, timing, peak bandwidth, result files."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype names

# Peak HBM bandwidth in GB/s (vendor numbers), matched against torch.cuda.get_device_name, most specific first.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM (HBM3)
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
]


def cpu_model() -> str | None:
    """The CPU's model name where the OS tells it (Linux: ``/proc/cpuinfo``), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def device_info(device: torch.device) -> dict:
    """Name, library versions and (on CUDA) multiprocessors and the known peak bandwidth of ``device``."""
    info = {
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # triton is optional (the `test` extra)
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["peak_gbps"] = known_peak_gbps(props.name)
    else:
        info["name"] = platform.processor() or platform.machine()
        model = cpu_model()
        if model:  # (results differ between hosts of one architecture far more than between runs)
            info["name"] += f" ({model})"
        info["cpu_threads"] = torch.get_num_threads()
        info["peak_gbps"] = None
    return info


def known_peak_gbps(name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key.lower() in name.lower():
            return gbps
    return None


def device_tag(info: dict) -> str:
    """A file-name-safe short name: ``cpu`` or e.g. ``nvidia_h100_80gb_hbm3``."""
    if info["device_type"] != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", info["name"].lower()).strip("_")


def time_fn(fn, device: torch.device, warmup: int = 5, iters: int = 20, stat: str = "median") -> float:
    """Wall time of ``fn()`` in milliseconds over ``iters`` calls (CUDA events on GPU, perf_counter on CPU),
    summarised by ``stat``: ``"median"`` or ``"min"`` (for a shared CPU, whose scheduling only adds time)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return min(times) if stat == "min" else statistics.median(times)


def timed(fn, device: torch.device):
    """``(fn(), seconds)``: one call's wall time, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)


def write_results(stem: str, payload: dict, markdown: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir`` (default ``bench/results``)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def env_backend() -> str:
    return os.environ.get("FASTALIGN_KERNELS", "auto")
