"""JAX/Flax recipes: the SDXL-on-TPU guide's settings as data (parameter dtype, split_head_dim, jit or AOT,
device count).

Tags are ``-``-joined tokens in a fixed order: parameter dtype (``fp32``/``bf16``), execution mode (``jit``:
the pipeline's own ``jit=True`` path; ``aot``: ``pmap(...).lower(...).compile()``), then optional
``splithead`` (the UNet's ``split_head_dim``) and a device count (``4dev``; ``alldev`` = every local device;
omitted for one device). Example: ``bf16-aot-splithead-8dev``. ``bf16`` casts the parameters only (the
scheduler state stays float32 and the modules keep computing in float32), as upstream's ``sdxl_single.py``
does. This module imports no framework.
"""

from __future__ import annotations

import dataclasses
import re

from diffperf.cases import Conditions, FrameworkSpec, Recipe, RecipeError, register

DTYPES = ("fp32", "bf16")
MODES = ("jit", "aot")
_DEV_RE = re.compile(r"^(\d+)dev$")


@dataclasses.dataclass(frozen=True)
class FlaxRecipe(Recipe):
    """One combination of the Flax pipeline settings; ``devices=0`` means all local devices."""

    framework = "jax"

    dtype: str = "fp32"
    mode: str = "jit"
    split_head_dim: bool = False
    devices: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise RecipeError(f"unknown parameter dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.mode not in MODES:
            raise RecipeError(f"unknown execution mode {self.mode!r}; choose from {', '.join(MODES)}")
        if not isinstance(self.devices, int) or isinstance(self.devices, bool) or self.devices < 0:
            raise RecipeError(f"devices must be an int >= 0 (0 = all local devices), got {self.devices!r}")

    def tag(self) -> str:
        parts = [self.dtype, self.mode]
        if self.split_head_dim:
            parts.append("splithead")
        if self.devices == 0:
            parts.append("alldev")
        elif self.devices != 1:
            parts.append(f"{self.devices}dev")
        return "-".join(parts)

    @classmethod
    def from_tag(cls, tag: str) -> "FlaxRecipe":
        tokens = [t for t in tag.strip().split("-") if t]
        kw: dict = {}
        if not tokens or tokens[0] not in DTYPES:
            raise RecipeError(f"recipe {tag!r} must start with a parameter dtype ({', '.join(DTYPES)})")
        kw["dtype"] = tokens.pop(0)
        if not tokens or tokens[0] not in MODES:
            raise RecipeError(f"recipe {tag!r}: the second token must be the execution mode ({', '.join(MODES)})")
        kw["mode"] = tokens.pop(0)
        for tok in tokens:
            m = _DEV_RE.match(tok)
            if tok == "splithead":
                kw["split_head_dim"] = True
            elif tok == "alldev" or m:
                if "devices" in kw:
                    raise RecipeError(f"recipe {tag!r} names two device counts")
                kw["devices"] = 0 if tok == "alldev" else int(m.group(1))
                if tok != "alldev" and kw["devices"] == 0:
                    raise RecipeError(f"recipe {tag!r}: '0dev' is not a device count; write 'alldev'")
            else:
                raise RecipeError(f"recipe {tag!r}: unknown token {tok!r} (known: splithead, <n>dev, alldev)")
        recipe = cls(**kw)
        return cls.canonical(recipe, tag)

    def unsupported(self, device: str) -> str | None:
        # Device counts and backends are only known once jax is imported: build() skips for those.
        return None

    def fidelity_thresholds(self) -> tuple[float, float]:
        # Tiny preset, 2 steps, 64x64, vs fp32-aot: bf16 params 51 dB, splithead 86 dB, jit/aot/device 0 identical.
        # The torch stack's levels are kept so that the deeper presets have headroom.
        if self.dtype == "bf16":
            return (20.0, 0.98)
        if self.split_head_dim:
            return (35.0, 0.999)
        return (40.0, 0.9999)

    def reference(self) -> "FlaxRecipe":
        return FlaxRecipe(dtype="fp32", mode="jit", split_head_dim=False, devices=1)

    def reference_on(self, device: str) -> "FlaxRecipe":
        # An fp32 SDXL needs ~12.9 GiB of a TPU v5e's 16 GiB before activations, and the seed never runs fp32:
        # on TPU the reference is the seed's bf16 parameters, jit, one device.
        if device == "tpu":
            return FlaxRecipe(dtype="bf16", mode="jit", split_head_dim=False, devices=1)
        return self.reference()


R = FlaxRecipe
GUIDE_LADDER = (
    R(),  # baseline: fp32 params, the pipeline's own jit, one device
    R(dtype="bf16"),
    R(dtype="bf16", mode="aot"),
    R(dtype="bf16", mode="aot", split_head_dim=True),
    R(dtype="bf16", mode="aot", split_head_dim=True, devices=0),
)
LADDER_STEP_NAMES = ("baseline", "bf16", "+aot", "+splithead", "+alldev")
# The SDXL-on-TPU seed's own two programs: the pipeline's jit and AOT lower+compile, both with bf16 parameters,
# split heads and every device.
SEED = (R(dtype="bf16", split_head_dim=True, devices=0), R(dtype="bf16", mode="aot", split_head_dim=True, devices=0))
SEED_NEGATIVE_PROMPT = "cartoon, illustration, animation. face. male, female"

SPEC = register(
    FrameworkSpec(
        name="jax",
        recipe_cls=FlaxRecipe,
        named={
            "ladder": GUIDE_LADDER,
            **{name.lstrip("+"): (r,) for name, r in zip(LADDER_STEP_NAMES, GUIDE_LADDER)},
            "modes": (R(), R(mode="aot")),
            "dtypes": (R(mode="aot"), R(dtype="bf16", mode="aot")),
            "scaling": tuple(R(dtype="bf16", mode="aot", split_head_dim=True, devices=n) for n in (1, 2, 4, 8)),
            "seed": SEED,
        },
        defaults={
            # The reference and its AOT twin (compile apart from the first call) keep the default run short.
            "cpu": Conditions("tiny", "modes", source="CPU smoke run"),
            "cuda": Conditions("sdxl", "ladder", source="the JAX seed's ladder on a GPU (the seed itself is TPU-only)"),
            "tpu": Conditions("sdxl", "seed", steps=25, batch_size=1, guidance_scale=5.0,
                              negative_prompt=SEED_NEGATIVE_PROMPT,
                              source="jax-sdxl-tpu.md: SDXL 1024x1024, 25 steps, guidance 5.0, a negative prompt, "
                                     "one image per device on every device, jit and AOT, bf16, split heads"),
        },
        module="pipelines.flax_sd",
    )
)
