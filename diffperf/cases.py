"""The benchmark matrix as data.

A :class:`Case` is one pipeline parametrization: framework, recipe (the framework's optimization
settings), preset, device, batch size, steps and resolution. Recipes are small frozen dataclasses
defined next to each builder (``pipelines/*.py``); each can render itself as a readable tag
(``bf16-sdpa-cl-compile``) and parse one back, say why it cannot run on a device, and name the
fidelity thresholds it must meet against the float32 reference.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Iterable, Mapping, Sequence

from diffperf.presets import Preset, get_preset

FRAMEWORKS = ("torch", "tf", "jax")
DEVICES = ("cpu", "cuda", "tpu")


class RecipeError(ValueError):
    """A recipe tag or combination that is invalid on every machine (not merely unsupported here)."""


@dataclasses.dataclass(frozen=True)
class ExpectedError:
    """The error a known upstream failure raises, as data: the exception class's full dotted name and a
    regex its message must contain. Matched against the raised error's class hierarchy by name, so
    declaring it imports no framework; any other error is a real failure, not the known one."""

    type_name: str  # e.g. "tensorflow.python.framework.errors_impl.InvalidArgumentError"
    match: str = ""

    def matches(self, exc: BaseException) -> bool:
        names = {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}
        return self.type_name in names and re.search(self.match, str(exc)) is not None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Base class of the per-framework optimization recipes."""

    framework: ClassVar[str] = ""

    def tag(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_tag(cls, tag: str) -> "Recipe":  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def canonical(recipe: "Recipe", tag: str) -> "Recipe":
        """Return ``recipe`` if ``tag`` is its canonical spelling; else a RecipeError saying how to write it."""
        if recipe.tag() != "-".join(t for t in tag.strip().split("-") if t):
            raise RecipeError(f"recipe {tag!r} is out of order or not canonical; write it as {recipe.tag()!r}")
        return recipe

    def unsupported(self, device: str) -> str | None:
        """Why this recipe cannot run on ``device`` (a skip reason), or ``None``."""
        return None

    def known_failure(self, device: str) -> str | None:
        """A known upstream limitation (turned into a strict xfail), or ``None``."""
        return None

    def known_failure_raises(self, device: str) -> "ExpectedError | None":
        """The error :meth:`known_failure` raises (the xfail's ``raises=``); required when it is not ``None``."""
        return None

    def check_preset(self, preset: Preset) -> None:
        """Raise :class:`RecipeError` when this recipe cannot run ``preset`` on any machine."""

    def fidelity_thresholds(self) -> tuple[float, float]:
        """``(min_psnr_db, min_latent_cosine)`` this recipe must reach against the fp32 reference."""
        return (40.0, 0.999)

    def reference(self) -> "Recipe":
        """The float32, unoptimized recipe of the same framework (the fidelity reference)."""
        return type(self)()

    def reference_on(self, device: str) -> "Recipe":
        """The fidelity reference on ``device``: :meth:`reference` unless the device cannot hold it."""
        return self.reference()

    @property
    def is_reference(self) -> bool:
        return self == self.reference()


@dataclasses.dataclass(frozen=True)
class Case:
    """One pipeline parametrization; ``id`` is its readable pytest id."""

    framework: str
    recipe: Recipe
    preset: str
    device: str = "cpu"
    batch_size: int = 1
    steps: int = 10
    height: int | None = None
    width: int | None = None
    seed: int = 0
    weights: str | None = None  # a local diffusers pipeline folder instead of random weights
    prompt: str = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
    guidance_scale: float | None = None  # None: the preset's
    negative_prompt: str | None = None  # None: the pipeline's unconditional input (empty prompt / zeros)

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise RecipeError(f"unknown framework {self.framework!r}; known: {', '.join(FRAMEWORKS)}")
        if self.device not in DEVICES:
            raise RecipeError(f"unknown device {self.device!r}; known: {', '.join(DEVICES)}")
        if self.recipe.framework != self.framework:
            raise RecipeError(f"recipe {self.recipe.tag()!r} belongs to {self.recipe.framework}, not {self.framework}")
        preset = get_preset(self.preset)
        self.recipe.check_preset(preset)
        if self.height is None:
            object.__setattr__(self, "height", preset.height)
        if self.width is None:
            object.__setattr__(self, "width", preset.width)
        if self.batch_size < 1:
            raise RecipeError(f"batch size must be >= 1, got {self.batch_size}")
        if self.steps < 1:
            raise RecipeError(f"steps must be >= 1, got {self.steps}")
        if self.guidance_scale is None:
            object.__setattr__(self, "guidance_scale", preset.guidance_scale)
        factor = preset.vae_scale_factor * 2 ** (len(preset.unet["down_block_types"]) - 1)
        if self.height % factor or self.width % factor:
            raise RecipeError(
                f"resolution {self.height}x{self.width} is not a multiple of {factor} for preset {self.preset!r}"
            )

    @property
    def id(self) -> str:
        preset = get_preset(self.preset)
        parts = [self.preset, self.recipe.tag()]
        if (self.height, self.width) != (preset.height, preset.width):
            parts.append(f"{self.height}x{self.width}")
        parts.append(f"bs{self.batch_size}")
        parts.append(f"{self.steps}steps")
        if self.guidance_scale != preset.guidance_scale:
            parts.append(f"cfg{self.guidance_scale:g}")
        if self.negative_prompt:
            parts.append("neg")
        return "-".join(parts)

    @property
    def full_id(self) -> str:
        """The id with its framework and device, as the test ids show it (``torch-cpu-tiny-fp32-sdpa-bs1-4steps``)."""
        return f"{self.framework}-{self.device}-{self.id}"

    @property
    def reference(self) -> "Case":
        """The same case with the framework's unoptimized reference recipe for its device (fidelity reference)."""
        return dataclasses.replace(self, recipe=self.recipe.reference_on(self.device))

    @property
    def is_reference(self) -> bool:
        return self == self.reference

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "recipe"}
        d["recipe"] = self.recipe.tag()
        d["recipe_fields"] = dataclasses.asdict(self.recipe)
        d["id"] = self.id
        return d


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What a framework runs on one device when the options name nothing: a seed's stated conditions.

    ``recipes`` is a named recipe set of the framework; ``steps`` and ``resolution`` default to the
    preset's; ``guidance_scale`` to the preset's; ``negative_prompt`` ``None`` is the pipeline's own
    unconditional input. ``source`` says where the figures come from.
    """

    preset: str
    recipes: str
    steps: int | None = None
    batch_size: int = 1
    resolution: tuple[int, int] | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        get_preset(self.preset)  # a KeyError naming the known presets
        if self.steps is not None and self.steps < 1:
            raise RecipeError(f"default steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise RecipeError(f"default batch size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class FrameworkSpec:
    """What each framework registers: its recipe class, its named recipes and ladders, its default conditions."""

    name: str
    recipe_cls: type[Recipe]
    named: Mapping[str, Sequence[Recipe]]  # ladder/alias name -> recipes, in order
    defaults: Mapping[str, Conditions]  # per device the stack targets (a device absent here is not targeted)
    module: str  # the builder module under ``pipelines``
    presets: tuple[str, ...] | None = None  # the presets the builder can build (None: every preset)

    def __post_init__(self) -> None:
        for device, cond in self.defaults.items():
            if device not in DEVICES:
                raise RecipeError(f"{self.name}: default conditions for unknown device {device!r}")
            if cond.recipes not in self.named:
                raise RecipeError(f"{self.name}/{device}: default recipe set {cond.recipes!r} is not a named set")

    @property
    def default(self) -> Mapping[str, str]:
        """The named recipe set run on each device when no recipe is selected."""
        return {device: cond.recipes for device, cond in self.defaults.items()}

    def unsupported_preset(self, preset: str) -> str | None:
        """Why this framework cannot build ``preset`` (a skip reason), or ``None``."""
        if self.presets is None or preset in self.presets:
            return None
        return f"the {self.name} stack has no {preset!r} preset (it builds {', '.join(self.presets)})"


_REGISTRY: dict[str, FrameworkSpec] = {}


def register(spec: FrameworkSpec) -> FrameworkSpec:
    _REGISTRY[spec.name] = spec
    return spec


def framework_spec(name: str) -> FrameworkSpec:
    import importlib

    if name not in FRAMEWORKS:
        raise RecipeError(f"unknown framework {name!r}; known: {', '.join(FRAMEWORKS)}")
    if name not in _REGISTRY:
        # Recipe definitions live beside their builders but import no framework at module level.
        importlib.import_module({"torch": "pipelines.torch_recipes", "tf": "pipelines.tf_recipes",
                                 "jax": "pipelines.jax_recipes"}[name])
    return _REGISTRY[name]


def matrix_skip_reason(case: Case) -> str | None:
    """Why the matrix itself rules ``case`` out on any machine (preset the framework lacks, recipe not for
    the device), or ``None``. Hardware and installed stacks are :mod:`diffperf.hardware`'s business."""
    return framework_spec(case.framework).unsupported_preset(case.preset) or case.recipe.unsupported(case.device)


def resolve_recipes(framework: str, names: Iterable[str]) -> list[Recipe]:
    """Turn ladder names, aliases and tags into recipes, in order, without duplicates."""
    spec = framework_spec(framework)
    out: list[Recipe] = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name in spec.named:
            recipes = list(spec.named[name])
        else:
            try:
                recipes = [spec.recipe_cls.from_tag(name)]
            except RecipeError as exc:
                raise RecipeError(
                    f"{framework}: {exc}; named recipes and ladders: {', '.join(spec.named)}"
                ) from None
        for r in recipes:
            if r not in out:
                out.append(r)
    return out
