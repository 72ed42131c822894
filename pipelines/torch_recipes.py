"""PyTorch/diffusers recipes: optimization settings as data, the guide's ladder, unsupported cases.

Tags are ``-``-joined tokens in a fixed order: precision (``fp32``/``fp16``/``bf16``), attention
(``classic``/``sdpa``), then optional ``cl`` (channels_last), ``fuseqkv``, ``compile`` (mode
``max-autotune``, the guide's) or ``compiledefault`` (mode ``default``), ``graphbreaks`` (no fullgraph),
and a quantization: ``int8dq`` (int8 dynamic activation + int8 weight, the guide's), ``int8wo`` (int8
weight-only: not in the guide; applied with the guide's layer filters, and its named recipe compiles it, since
in eager it mostly measures dequantization), ``fp8dq`` (float8 dynamic activation + float8 weight, bf16 only,
compute capability >= 8.9). This module imports no framework.
"""

from __future__ import annotations

import dataclasses

from diffperf import hardware
from diffperf.cases import Conditions, FrameworkSpec, Recipe, RecipeError, register
from diffperf.presets import Preset

PRECISIONS = ("fp32", "fp16", "bf16")
ATTENTIONS = ("classic", "sdpa")
COMPILE_TOKENS = {"compile": "max-autotune", "compiledefault": "default"}
QUANTS = ("int8dq", "int8wo", "fp8dq")


@dataclasses.dataclass(frozen=True)
class TorchRecipe(Recipe):
    """One combination of the PyTorch optimization steps (applied in the guide's order)."""

    framework = "torch"

    precision: str = "fp32"
    attention: str = "classic"
    channels_last: bool = False
    fuse_qkv: bool = False
    compile_mode: str | None = None  # None, "default" or "max-autotune"
    fullgraph: bool = True
    quant: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RecipeError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.attention not in ATTENTIONS:
            raise RecipeError(f"unknown attention {self.attention!r}; choose from {', '.join(ATTENTIONS)}")
        if self.compile_mode not in (None, *COMPILE_TOKENS.values()):
            raise RecipeError(f"unknown compile mode {self.compile_mode!r}")
        if self.quant not in (None, *QUANTS):
            raise RecipeError(f"unknown quantization {self.quant!r}; choose from {', '.join(QUANTS)}")
        if self.fuse_qkv and self.attention != "sdpa":
            raise RecipeError("'fuseqkv' runs through SDPA (FusedAttnProcessor2_0); it needs 'sdpa' attention")
        if not self.fullgraph and self.compile_mode is None:
            raise RecipeError("'graphbreaks' (fullgraph=False) needs a compile token")
        if self.quant == "fp8dq" and self.precision != "bf16":
            raise RecipeError(
                f"recipe {self.tag()!r}: 'fp8dq' needs bf16 (torchao's float8 PerRow scaling takes bf16 weights), "
                f"not {self.precision}"
            )

    def check_preset(self, preset: Preset) -> None:
        if self.precision == "fp16" and self.quant is not None and preset.vae.get("force_upcast"):
            raise RecipeError(
                f"recipe {self.tag()!r} on preset {preset.name!r}: fp16 with {self.quant} quantization is not "
                f"supported: the preset's VAE has force_upcast=True, so diffusers casts the quantized VAE to "
                f"float32 and back on every call; use bf16"
            )

    def tag(self) -> str:
        parts = [self.precision, self.attention]
        if self.channels_last:
            parts.append("cl")
        if self.fuse_qkv:
            parts.append("fuseqkv")
        if self.compile_mode is not None:
            parts.append({v: k for k, v in COMPILE_TOKENS.items()}[self.compile_mode])
            if not self.fullgraph:
                parts.append("graphbreaks")
        if self.quant:
            parts.append(self.quant)
        return "-".join(parts)

    @classmethod
    def from_tag(cls, tag: str) -> "TorchRecipe":
        tokens = [t for t in tag.strip().split("-") if t]
        kw: dict = {}
        if not tokens or tokens[0] not in PRECISIONS:
            raise RecipeError(f"recipe {tag!r} must start with a precision ({', '.join(PRECISIONS)})")
        kw["precision"] = tokens.pop(0)
        if not tokens or tokens[0] not in ATTENTIONS:
            raise RecipeError(f"recipe {tag!r}: the second token must be the attention ({', '.join(ATTENTIONS)})")
        kw["attention"] = tokens.pop(0)
        for tok in tokens:
            if tok == "cl":
                kw["channels_last"] = True
            elif tok == "fuseqkv":
                kw["fuse_qkv"] = True
            elif tok in COMPILE_TOKENS:
                kw["compile_mode"] = COMPILE_TOKENS[tok]
            elif tok == "graphbreaks":
                kw["fullgraph"] = False
            elif tok in QUANTS:
                if "quant" in kw:
                    raise RecipeError(f"recipe {tag!r} names two quantizations")
                kw["quant"] = tok
            else:
                raise RecipeError(
                    f"recipe {tag!r}: unknown token {tok!r} (known: cl, fuseqkv, "
                    f"{', '.join(COMPILE_TOKENS)}, graphbreaks, {', '.join(QUANTS)})"
                )
        recipe = cls(**kw)
        return cls.canonical(recipe, tag)

    def unsupported(self, device: str) -> str | None:
        if device == "tpu":
            return "the PyTorch stack does not target TPUs (torch_xla is out of scope)"
        if self.quant == "fp8dq":
            if device != "cuda":
                return "float8 dynamic quantization needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper)"
            return hardware.fp8_skip_reason()
        if self.precision == "fp16" and device == "cpu":
            return "fp16 on CPU has no fast kernels and is not a recipe anyone ships; use bf16 or fp32 on CPU"
        return None

    def fidelity_thresholds(self) -> tuple[float, float]:
        # Calibrated on the tiny preset's random weights (see README, "Fidelity thresholds").
        if self.quant is not None:
            return (14.0, 0.95)
        if self.precision != "fp32":
            return (20.0, 0.98)
        if self.compile_mode is not None or self.attention == "sdpa" or self.fuse_qkv:
            return (35.0, 0.999)
        return (40.0, 0.9999)


R = TorchRecipe
GUIDE_LADDER = (
    R(),  # baseline: fp32, classic attention
    R(precision="bf16"),
    R(precision="bf16", attention="sdpa"),
    R(precision="bf16", attention="sdpa", channels_last=True, compile_mode="max-autotune"),
    R(precision="bf16", attention="sdpa", channels_last=True, fuse_qkv=True, compile_mode="max-autotune"),
    R(precision="bf16", attention="sdpa", channels_last=True, fuse_qkv=True, compile_mode="max-autotune", quant="int8dq"),
)
LADDER_STEP_NAMES = ("baseline", "bf16", "+sdpa", "+compile", "+fuse_qkv", "+int8dq")

SPEC = register(
    FrameworkSpec(
        name="torch",
        recipe_cls=TorchRecipe,
        named={
            "ladder": GUIDE_LADDER,
            **{name.lstrip("+"): (r,) for name, r in zip(LADDER_STEP_NAMES, GUIDE_LADDER)},
            "eager": GUIDE_LADDER[:3],
            # The default on CPU: what runs in minutes on 2 cores. bf16 without AVX-512-bf16 and
            # channels_last under inductor are slow on such CPUs; ask for them with --perf-recipes ladder.
            "cpu": (R(), R(attention="sdpa"), R(attention="sdpa", compile_mode="default")),
            # Not in the guide: the guide's top rung with int8 weight-only instead of dynamic quantization.
            "int8wo": (R(precision="bf16", attention="sdpa", channels_last=True, fuse_qkv=True,
                         compile_mode="max-autotune", quant="int8wo"),),
            "fp8dq": (R(precision="bf16", attention="sdpa", channels_last=True, compile_mode="max-autotune", quant="fp8dq"),),
        },
        defaults={
            "cpu": Conditions("tiny", "cpu", source="CPU smoke run"),
            "cuda": Conditions("sdxl", "ladder", steps=30, batch_size=1,
                               source="diffusers-accelerate-inference-guide.md (A100-80GB: SDXL 1024x1024, 30 steps, batch 1)"),
        },
        module="pipelines.torch_diffusers",
    )
)
