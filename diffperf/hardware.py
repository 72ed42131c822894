"""Hardware gating in one place, the hardware identity used for baselines, and framework versions.

Note: collection must stay cheap and must not grab device memory, so :func:`skip_reason` decides from
``nvidia-smi`` / torch / device files and imports no TensorFlow or JAX. A framework that is installed
without a backend for the device is caught later, when its builder starts, with its own skip reason.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess

FRAMEWORK_PACKAGES = {
    "torch": ("torch", "diffusers", "transformers", "torchao"),
    "tf": ("tensorflow", "keras", "keras-cv"),
    "jax": ("jax", "jaxlib", "flax", "diffusers", "transformers"),
}
FRAMEWORK_IMPORT = {"torch": "torch", "tf": "tensorflow", "jax": "jax"}
EXTRA_FOR = {"torch": "torch", "tf": "tf", "jax": "jax"}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def framework_installed(framework: str) -> bool:
    return all(package_version(p) is not None for p in FRAMEWORK_PACKAGES[framework])


def software_versions() -> dict[str, str | None]:
    names = sorted({p for ps in FRAMEWORK_PACKAGES.values() for p in ps} | {"numpy", "pytest-benchmark", "scipy"})
    return {n: package_version(n) for n in names}


@functools.lru_cache(maxsize=None)
def nvidia_gpus() -> tuple[dict, ...]:
    """GPUs reported by ``nvidia-smi`` (name, memory, driver); empty when there is none.

    ``DIFFPERF_FAKE_GPUS=N`` (tests only) reports N fake GPUs instead, filtered by ``CUDA_VISIBLE_DEVICES``
    like real ones.
    """
    fake = os.environ.get("DIFFPERF_FAKE_GPUS", "").strip()
    if fake:
        if not fake.isdigit():
            raise ValueError(f"DIFFPERF_FAKE_GPUS must be a number of fake GPUs, got {fake!r}")
        out = "Fake GPU, 1024, fake\n" * int(fake)
    elif (exe := shutil.which("nvidia-smi")) is None:
        return ()
    else:
        try:
            out = subprocess.run(
                [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ()
    gpus = []
    for line in out.strip().splitlines():
        name, mem, driver = (x.strip() for x in line.split(","))
        gpus.append({"name": name, "memory_mib": int(float(mem)), "driver": driver})
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        idx = [int(i) for i in visible.split(",") if i.strip().isdigit()]
        gpus = [g for i, g in enumerate(gpus) if i in idx]
    return tuple(gpus)


@functools.lru_cache(maxsize=None)
def tpu_type() -> str | None:
    """The TPU accelerator type of a TPU VM (``v5litepod-8``...), from the environment or device files."""
    for var in ("TPU_ACCELERATOR_TYPE", "ACCELERATOR_TYPE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
        return "tpu"
    return None


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def skip_reason(device: str) -> str | None:
    """Why cases for ``device`` cannot run on this machine, or ``None`` when they can."""
    if device == "cpu":
        return None
    if device == "cuda":
        if os.environ.get("DIFFPERF_FAKE_CUDA"):
            return None
        if not nvidia_gpus():
            return "no CUDA device on this machine (nvidia-smi found no GPU); run with -m cpu or on a GPU runner"
        return None
    if device == "tpu":
        if tpu_type() is None:
            return "no TPU on this machine (not a TPU VM: no /dev/accel*); run with -m cpu or on a TPU runner"
        return None
    raise ValueError(f"unknown device {device!r}")


def default_device() -> str:
    """The most capable device present: cuda, then tpu, then cpu."""
    for dev in ("cuda", "tpu"):
        if skip_reason(dev) is None:
            return dev
    return "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def hardware_id(device: str = "cpu") -> str:
    """A stable, readable identity of the hardware running ``device`` cases (a baseline file name).

    GPU model and count for CUDA, TPU type for TPU, CPU model and usable cores for CPU.
    """
    if device == "cuda":
        gpus = nvidia_gpus()
        if gpus:
            return f"cuda-{len(gpus)}x-{_slug(gpus[0]['name'])}"
        return "cuda-unknown"
    if device == "tpu":
        return f"tpu-{_slug(tpu_type() or 'unknown')}"
    return f"cpu-{cpu_count()}c-{_slug(cpu_model())}"


def machine_info() -> dict:
    """What ``pytest_benchmark_update_machine_info`` adds: versions, GPUs, CPU, hardware ids."""
    gpus = nvidia_gpus()
    return {
        "diffperf_versions": software_versions(),
        "cpu_model": cpu_model(),
        "cpu_count_usable": cpu_count(),
        "gpu": {
            "count": len(gpus),
            "models": sorted({g["name"] for g in gpus}),
            "driver": gpus[0]["driver"] if gpus else None,
            "memory_mib": [g["memory_mib"] for g in gpus],
        },
        "tpu": tpu_type(),
        "hardware_ids": {d: hardware_id(d) for d in ("cpu", "cuda", "tpu") if skip_reason(d) is None},
    }
