"""The public Python API: build or measure any parametrization outside pytest.

>>> from diffperf import api
>>> runner = api.build_pipeline("bf16-sdpa", framework="torch", preset="tiny")   # doctest: +SKIP
>>> images = runner.generate().images                                            # doctest: +SKIP
>>> runner.close()                                                               # doctest: +SKIP
>>> record = api.run_case("fp32-sdpa", preset="tiny", rounds=5)                  # doctest: +SKIP
"""

from __future__ import annotations

from diffperf.cases import Case, resolve_recipes
from diffperf.presets import get_preset


def make_case(recipe: str, *, framework: str = "torch", preset: str = "tiny", device: str = "cpu",
              steps: int | None = None, batch_size: int = 1, height: int | None = None, width: int | None = None,
              seed: int = 0, weights: str | None = None, guidance_scale: float | None = None,
              negative_prompt: str | None = None) -> Case:
    """A :class:`~diffperf.cases.Case` from a recipe tag or single-recipe name."""
    recipes = resolve_recipes(framework, [recipe])
    if len(recipes) != 1:
        raise ValueError(f"{recipe!r} names {len(recipes)} recipes; pass one tag (e.g. {recipes[0].tag()!r})")
    return Case(framework=framework, recipe=recipes[0], preset=preset, device=device,
                steps=steps or get_preset(preset).default_steps, batch_size=batch_size, height=height,
                width=width, seed=seed, weights=weights, guidance_scale=guidance_scale, negative_prompt=negative_prompt)


def build_pipeline(recipe: str | Case, **kwargs):
    """Build a runner (``generate()``, ``generate_instrumented()``, ``close()``) for a case."""
    from diffperf.harness import build

    case = recipe if isinstance(recipe, Case) else make_case(recipe, **kwargs)
    return build(case)


def run_case(recipe: str | Case, *, rounds: int = 5, warmup_rounds: int = 3, **kwargs) -> dict:
    """Build, time the cold start and the steady state (bare synchronized loop) and return the record."""
    from diffperf.harness import measure, prepare

    case = recipe if isinstance(recipe, Case) else make_case(recipe, **kwargs)
    prepared = prepare(case)
    try:
        return measure(prepared, None, rounds=rounds, warmup_rounds=warmup_rounds)
    finally:
        prepared.close()
