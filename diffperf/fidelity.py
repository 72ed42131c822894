"""The numerical fidelity guard: an optimized case against its float32, unoptimized reference.

Images are compared by PSNR (uint8, peak 255) and final latents by cosine similarity, each against a
threshold the recipe declares (reduced precision and quantization get looser ones). NaN or inf in the
output fails with a message that says so, before any comparison.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


class FidelityError(AssertionError):
    """An output that is not finite or too far from the reference."""


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise FidelityError(f"shape mismatch: output {a.shape} vs reference {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise FidelityError(f"shape mismatch: latents {a.shape} vs reference {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def check_finite(name: str, array: np.ndarray | None) -> None:
    if array is None:
        return
    arr = np.asarray(array)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            raise FidelityError(
                f"{name} contains non-finite values: {n_nan} NaN and {n_inf} inf out of {arr.size} "
                "(overflow in reduced precision, or a broken kernel)"
            )


@dataclasses.dataclass
class FidelityResult:
    psnr_db: float
    latent_cosine: float | None
    min_psnr_db: float
    min_latent_cosine: float

    @property
    def ok(self) -> bool:
        cos_ok = self.latent_cosine is None or self.latent_cosine >= self.min_latent_cosine
        return self.psnr_db >= self.min_psnr_db and cos_ok

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(self).items()} | {
            "identical": math.isinf(self.psnr_db)
        }

    def message(self, case_id: str) -> str:
        cos = "n/a" if self.latent_cosine is None else f"{self.latent_cosine:.5f}"
        return (
            f"{case_id}: output differs from the fp32 reference beyond its thresholds: "
            f"PSNR {self.psnr_db:.2f} dB (min {self.min_psnr_db:.1f}), latent cosine {cos} "
            f"(min {self.min_latent_cosine:.4f})"
        )


def compare(images, latents, ref_images, ref_latents, thresholds: tuple[float, float]) -> FidelityResult:
    """Compare an output with the reference; raise :class:`FidelityError` on NaN/inf."""
    check_finite("latents", latents)
    check_finite("images", images)
    check_finite("reference latents", ref_latents)
    cos = None
    if latents is not None and ref_latents is not None:
        cos = cosine(latents, ref_latents)
    return FidelityResult(psnr(images, ref_images), cos, thresholds[0], thresholds[1])
