"""TensorFlow/KerasCV recipes: optimization settings as data, the KerasCV guide's ladder, the SavedModel path.

Tags are ``-``-joined tokens in a fixed order: precision (``fp32``, ``mp16`` = Keras ``mixed_float16``,
``mpbf16`` = ``mixed_bfloat16``), then optional ``savedmodel`` (the three components exported as
SavedModels and run as loaded concrete functions), ``xla`` (``jit_compile=True``) and ``xlatext`` (the
SavedModel text encoder XLA-compiled too; a known upstream failure). This module imports no framework.
"""

from __future__ import annotations

import dataclasses

from diffperf.cases import Conditions, ExpectedError, FrameworkSpec, Recipe, RecipeError, register

PRECISIONS = {"fp32": "float32", "mp16": "mixed_float16", "mpbf16": "mixed_bfloat16"}
_TOKENS_OF_PRECISION = {v: k for k, v in PRECISIONS.items()}
# Field value -> tag token, accepted in either spelling.
PRECISION_ALIASES = {"fp32": "fp32", "float32": "fp32", "mixed_float16": "mixed_float16",
                     "mixed_bfloat16": "mixed_bfloat16"}

TF_ISSUE_59818 = (
    "tensorflow/tensorflow#59818: the KerasCV text encoder exported as a SavedModel (prompt and "
    "unconditional context, dynamic batch) cannot be XLA-compiled ('XLA inference fails complaining "
    "about branch shape mismatches'); the upstream SavedModel+XLA benchmark keeps it out of XLA"
)

# What tensorflow#59818 raises when the text encoder function is called (tf2xla's cond-branch check,
# on CPU and GPU alike); any other error (an OOM, a missing op) is a real failure.
TF_ISSUE_59818_RAISES = ExpectedError(
    "tensorflow.python.framework.errors_impl.InvalidArgumentError", r"branch_shape"
)


@dataclasses.dataclass(frozen=True)
class KerasRecipe(Recipe):
    """One combination of the KerasCV guide's settings (and the SavedModel + XLA recipe)."""

    framework = "tf"

    precision: str = "fp32"  # "fp32", "mixed_float16" or "mixed_bfloat16"
    jit_compile: bool = False
    savedmodel: bool = False
    xla_text_encoder: bool = False  # SavedModel path only: XLA-compile the text encoder too

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_ALIASES:
            raise RecipeError(
                f"unknown precision {self.precision!r}; choose from fp32, mixed_float16, mixed_bfloat16"
            )
        object.__setattr__(self, "precision", PRECISION_ALIASES[self.precision])
        if self.xla_text_encoder and not (self.savedmodel and self.jit_compile):
            raise RecipeError("'xlatext' (XLA text encoder) only applies to the SavedModel path with 'xla'")

    @property
    def keras_policy(self) -> str:
        """The Keras dtype policy name this recipe sets while building."""
        return "float32" if self.precision == "fp32" else self.precision

    def tag(self) -> str:
        parts = [_TOKENS_OF_PRECISION[self.keras_policy]]
        if self.savedmodel:
            parts.append("savedmodel")
        if self.jit_compile:
            parts.append("xla")
        if self.xla_text_encoder:
            parts.append("xlatext")
        return "-".join(parts)

    @classmethod
    def from_tag(cls, tag: str) -> "KerasRecipe":
        tokens = [t for t in tag.strip().split("-") if t]
        if not tokens or tokens[0] not in PRECISIONS:
            raise RecipeError(f"recipe {tag!r} must start with a precision ({', '.join(PRECISIONS)})")
        policy = PRECISIONS[tokens.pop(0)]
        kw: dict = {"precision": "fp32" if policy == "float32" else policy}
        flags = {"savedmodel": "savedmodel", "xla": "jit_compile", "xlatext": "xla_text_encoder"}
        for tok in tokens:
            if tok not in flags:
                raise RecipeError(f"recipe {tag!r}: unknown token {tok!r} (known: {', '.join(flags)})")
            if flags[tok] in kw:
                raise RecipeError(f"recipe {tag!r} repeats token {tok!r}")
            kw[flags[tok]] = True
        recipe = cls(**kw)
        return cls.canonical(recipe, tag)

    def unsupported(self, device: str) -> str | None:
        if device == "tpu":
            return "the TensorFlow/KerasCV stack does not target TPUs (no TPUStrategy wiring)"
        return None

    def known_failure(self, device: str) -> str | None:
        if self.xla_text_encoder:
            return TF_ISSUE_59818
        return None

    def known_failure_raises(self, device: str) -> ExpectedError | None:
        if self.xla_text_encoder:
            return TF_ISSUE_59818_RAISES
        return None

    def fidelity_thresholds(self) -> tuple[float, float]:
        # Calibrated on the tiny preset's random weights, like the torch recipes.
        if self.precision != "fp32":
            return (20.0, 0.98)
        if self.jit_compile or self.savedmodel:
            return (35.0, 0.999)
        return (40.0, 0.9999)


R = KerasRecipe
GUIDE_LADDER = (
    R(),  # standard
    R(precision="mixed_float16"),
    R(jit_compile=True),
    R(precision="mixed_float16", jit_compile=True),
)
LADDER_STEP_NAMES = ("standard", "mixed-precision", "xla", "xla+mixed-precision")
SAVEDMODEL = (R(savedmodel=True), R(savedmodel=True, jit_compile=True))

SPEC = register(
    FrameworkSpec(
        name="tf",
        recipe_cls=KerasRecipe,
        named={
            "ladder": GUIDE_LADDER,
            **{name: (r,) for name, r in zip(LADDER_STEP_NAMES, GUIDE_LADDER)},
            "savedmodel": SAVEDMODEL,
            "savedmodel-xlatext": (R(savedmodel=True, jit_compile=True, xla_text_encoder=True),),
            "bf16": (R(precision="mixed_bfloat16"), R(precision="mixed_bfloat16", jit_compile=True)),
            "all": GUIDE_LADDER + SAVEDMODEL,
            "cpu": (R(), R(jit_compile=True)),
        },
        defaults={
            # The guide's baseline and its XLA step (mixed float16 has no fast CPU kernels).
            "cpu": Conditions("tiny", "cpu", source="CPU smoke run"),
            # The KerasCV guide's ladder and the TF seed's SavedModel / SavedModel+XLA rows, at the guide's conditions.
            "cuda": Conditions("sd15", "all", steps=25, batch_size=3, resolution=(512, 512),
                               source="kerascv-stable-diffusion-guide.md (A100-SXM4-40GB: 512x512, 3 images, 25 steps); "
                                      "tf-savedmodel-xla-stable-diffusion.md (A100 a2-highgpu-1g: 512x512, 3 images)"),
        },
        module="pipelines.kerascv_sd",
        presets=("tiny", "sd15"),  # KerasCV has no Stable Diffusion XL
    )
)
