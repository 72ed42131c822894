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
def _nvidia_smi_capabilities() -> tuple[tuple[int, int], ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    caps = []
    for line in out.strip().splitlines():
        major, _, minor = line.strip().partition(".")
        if major.isdigit() and minor.isdigit():
            caps.append((int(major), int(minor)))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        idx = [int(i) for i in visible.split(",") if i.strip().isdigit()]
        caps = [c for i, c in enumerate(caps) if i in idx]
    return tuple(caps)


def cuda_compute_capability() -> tuple[int, int] | None:
    """The lowest compute capability of the visible GPUs (``(8, 0)`` on an A100), or ``None`` when unknown.

    ``DIFFPERF_FAKE_CUDA_CAPABILITY=8.0`` fakes it (tests, or a machine whose nvidia-smi lacks the query).
    """
    fake = os.environ.get("DIFFPERF_FAKE_CUDA_CAPABILITY")
    if fake:
        major, _, minor = fake.strip().partition(".")
        if not (major.isdigit() and minor.isdigit()):
            raise ValueError(f"DIFFPERF_FAKE_CUDA_CAPABILITY={fake!r}: expected MAJOR.MINOR, e.g. 8.9")
        return int(major), int(minor)
    caps = _nvidia_smi_capabilities()
    return min(caps) if caps else None


FP8_MIN_CAPABILITY = (8, 9)


def fp8_skip_reason(capability: tuple[int, int] | None = None) -> str | None:
    """Why float8 kernels cannot run on this GPU (``capability``, else :func:`cuda_compute_capability`), or ``None``.

    ``None`` too when the capability is unknown; the torch builder asks again with torch's own reading.
    """
    cap = capability if capability is not None else cuda_compute_capability()
    if cap is None or tuple(cap) >= FP8_MIN_CAPABILITY:
        return None
    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    return (f"float8 dynamic quantization needs a GPU with compute capability >= {need} (Ada/Hopper); "
            f"this one is {cap[0]}.{cap[1]} (torchao asserts CUDA>=8.9)")


@functools.lru_cache(maxsize=None)
def tpu_type() -> str | None:
    """The TPU accelerator type of a TPU VM (``v5litepod-8``...), from the environment or device files.

    ``DIFFPERF_FAKE_TPU=<type>`` pretends to be a TPU VM of that type (collection tests only).
    """
    for var in ("DIFFPERF_FAKE_TPU", "TPU_ACCELERATOR_TYPE", "ACCELERATOR_TYPE"):
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


def tpu_chips() -> tuple[str, int] | None:
    """``(device kind, count)`` of this VM's TPU chips as JAX sees them (``("TPU v5 lite", 8)``), or ``None``.

    Imports JAX (and so initializes its TPU backend) only on a machine that has a TPU.
    """
    if tpu_type() is None:
        return None
    try:
        import jax

        devices = jax.devices("tpu")
    except Exception:  # noqa: BLE001 - no TPU backend (jax[tpu] missing) or no jax at all
        return None
    if not devices:
        return None
    return str(devices[0].device_kind), len(devices)


def hardware_id(device: str = "cpu") -> str:
    """A stable, readable identity of the hardware running ``device`` cases (a baseline file name).

    GPU model and count for CUDA, TPU chip kind and count for TPU (the accelerator type when JAX cannot
    tell), CPU model and usable cores for CPU.
    """
    if device == "cuda":
        gpus = nvidia_gpus()
        if gpus:
            return f"cuda-{len(gpus)}x-{_slug(gpus[0]['name'])}"
        return "cuda-unknown"
    if device == "tpu":
        chips = tpu_chips()
        if chips is not None:
            return f"tpu-{chips[1]}x-{_slug(chips[0])}"
        return f"tpu-{_slug(tpu_type() or 'unknown')}-unknown-chips"
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
