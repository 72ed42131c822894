"""The JAX/Flax builder: diffusers' ``FlaxStableDiffusionPipeline`` / ``FlaxStableDiffusionXLPipeline``
(diffusers 0.39, the last release with them) built offline from a preset with seeded random parameters, run
the way the SDXL-on-TPU guide runs them (see :class:`~pipelines.jax_recipes.FlaxRecipe`).

* ``jit`` mode calls the pipeline's own ``__call__(..., jit=True)`` (its module-level ``pmap``); the
  compilation happens inside the first call and is reported from JAX's compile events.
* ``aot`` mode lowers and compiles ``pmap(pipeline._generate)`` ahead of time at build, with steps, height,
  width (and ``return_latents`` for SDXL) static; lower and compile seconds go to :meth:`compile_info`
  (``ahead_of_time_compile_s``, the compile figure the harness reports and gates), so the harness's cold start
  (first ``generate()``) is only the call that fills the dispatch cache: the seed's three figures, "compiled
  in", "first inference" and "inference", are the record's ``compile_s``, ``cold_start_s`` and ``median_s``.
* ``case.guidance_scale`` and ``case.negative_prompt`` (the TPU default: the seed's 5.0 and its negative
  prompt, two more text-encoder passes on SDXL) reach both modes and the instrumented pieces.
* Every device renders ``case.batch_size`` images from its own key ``fold_in(PRNGKey(seed), device_index)``,
  so device 0 of an n-device run draws the same noise as the one-device reference.
* The persistent compilation cache lives in ``$DIFFPERF_CACHE_DIR/jax`` (default ``<repo>/.diffperf-cache``);
  ``benchmarks/jax_cache.py`` measures a cold and a warm-cache start in fresh processes.

Note: diffusers and transformers decide once, when first imported, whether Flax is usable, from ``USE_FLAX``
(``0`` turns every Flax class into a dummy). The PyTorch builder sets ``USE_FLAX=0`` with ``setdefault``.
Importing this module first sets ``USE_FLAX=1``; if diffusers was already imported with Flax disabled,
:func:`flax_api` flips both libraries' availability flags and imports the Flax modules by their module paths
(the lazy top-level names were frozen without them), so both stacks work in one process in either order.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import logging
import os
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share a GPU with other processes
os.environ.setdefault("USE_TF", "0")
if "diffusers" not in sys.modules and "transformers" not in sys.modules:
    os.environ["USE_FLAX"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffperf import progress  # noqa: E402
from diffperf.cases import Case  # noqa: E402
from diffperf.memory import RSSProbe  # noqa: E402
from diffperf.presets import Preset, get_preset  # noqa: E402
from diffperf.tokenizer import clip_tokenizer  # noqa: E402
from pipelines.base import Breakdown, Generation, MemoryProbe, Runner, StepClock  # noqa: E402
from pipelines.jax_recipes import FlaxRecipe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}


# --------------------------------------------------------------------------------------------------
# Persistent compilation cache and compile accounting
# --------------------------------------------------------------------------------------------------



# What build() imports lazily, imported by the harness before the case's memory mark (see torch_diffusers).
PRELOAD = (("pipelines.flax_sd", ("flax_api()",)),)

def cache_dir() -> Path:
    """The persistent compilation cache folder: ``$DIFFPERF_CACHE_DIR/jax`` or ``<repo>/.diffperf-cache/jax``."""
    return Path(os.environ.get("DIFFPERF_CACHE_DIR", str(REPO / ".diffperf-cache"))) / "jax"


def enable_persistent_cache() -> Path:
    """Point JAX's persistent compilation cache at :func:`cache_dir`, caching even tiny, fast programs."""
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits", "/jax/compilation_cache/cache_misses": "cache_misses"}
_counters: dict[str, float] = {}
_counters_lock = threading.Lock()


def _on_duration(event: str, duration: float, **_: Any) -> None:
    key = _COMPILE_EVENTS.get(event)
    if key is not None:
        with _counters_lock:
            _counters[key] = _counters.get(key, 0.0) + duration


def _on_event(event: str, **_: Any) -> None:
    key = _CACHE_EVENTS.get(event)
    if key is not None:
        with _counters_lock:
            _counters[key] = _counters.get(key, 0) + 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


@contextlib.contextmanager
def compile_events():
    """Collect JAX's compile figures (trace/lower/backend seconds, persistent cache hits) inside the block."""
    with _counters_lock:
        before = dict(_counters)
    out: dict[str, float] = {}
    try:
        yield out
    finally:
        with _counters_lock:
            after = dict(_counters)
        for key in (*_COMPILE_EVENTS.values(), *_CACHE_EVENTS.values()):
            out[key] = after.get(key, 0) - before.get(key, 0)
        out["compile_s"] = out["trace_s"] + out["lower_s"] + out["backend_compile_s"]


enable_persistent_cache()


# --------------------------------------------------------------------------------------------------
# Flax classes (robust to diffusers/transformers having been imported with USE_FLAX=0)
# --------------------------------------------------------------------------------------------------


def _enable_flax_flags() -> bool:
    """Turn Flax on in both libraries' availability flags; return whether anything had to be flipped."""
    import diffusers.utils.import_utils as diu
    import transformers.utils.import_utils as tiu

    flipped = False
    if not diu._flax_available:
        diu._flax_available, flipped = True, True
    for name in ("_flax_available", "_jax_available"):
        if hasattr(tiu, name) and not getattr(tiu, name):
            setattr(tiu, name, True)
            flipped = True
    return flipped


@contextlib.contextmanager
def _quiet_deprecations():
    """diffusers logs a deprecation warning per Flax class instance; keep the benchmark output readable."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Flax classes are deprecated" not in record.getMessage()


def _silence_flax_deprecation() -> None:
    """diffusers 0.39 warns in every Flax module's ``setup`` (so on every trace); keep that one line out."""
    from diffusers.utils import logging as dlogging

    for handler in dlogging._get_library_root_logger().handlers:
        if not any(isinstance(f, _DropFlaxDeprecation) for f in handler.filters):
            handler.addFilter(_DropFlaxDeprecation())


_API: types.SimpleNamespace | None = None


def flax_api() -> types.SimpleNamespace:
    """The Flax model, scheduler and pipeline classes, imported by module path."""
    global _API
    if _API is not None:
        return _API
    flipped = _enable_flax_flags()
    _silence_flax_deprecation()
    mods = {
        "unet": "diffusers.models.unets.unet_2d_condition_flax",
        "vae": "diffusers.models.vae_flax",
        "pndm": "diffusers.schedulers.scheduling_pndm_flax",
        "euler": "diffusers.schedulers.scheduling_euler_discrete_flax",
        "clip": "transformers.models.clip.modeling_flax_clip",
    }
    m = {k: importlib.import_module(v) for k, v in mods.items()}
    api = types.SimpleNamespace(
        FlaxUNet2DConditionModel=m["unet"].FlaxUNet2DConditionModel,
        FlaxAutoencoderKL=m["vae"].FlaxAutoencoderKL,
        FlaxPNDMScheduler=m["pndm"].FlaxPNDMScheduler,
        FlaxEulerDiscreteScheduler=m["euler"].FlaxEulerDiscreteScheduler,
        FlaxCLIPTextModel=m["clip"].FlaxCLIPTextModel,
        FlaxCLIPTextModelWithProjection=m["clip"].FlaxCLIPTextModelWithProjection,
    )
    if flipped:
        # The lazy top-level modules froze their name tables (and cached dummies) without Flax.
        import diffusers.models
        import diffusers.schedulers
        import transformers

        for name in ("FlaxUNet2DConditionModel", "FlaxAutoencoderKL"):
            setattr(diffusers.models, name, getattr(api, name))
        import diffusers.schedulers.scheduling_ddim_flax as ddim
        import diffusers.schedulers.scheduling_dpmsolver_multistep_flax as dpm
        import diffusers.schedulers.scheduling_lms_discrete_flax as lms

        for mod, name in ((ddim, "FlaxDDIMScheduler"), (dpm, "FlaxDPMSolverMultistepScheduler"),
                          (lms, "FlaxLMSDiscreteScheduler"), (m["pndm"], "FlaxPNDMScheduler"),
                          (m["euler"], "FlaxEulerDiscreteScheduler")):
            setattr(diffusers.schedulers, name, getattr(mod, name))
        for name in ("FlaxCLIPTextModel", "FlaxCLIPTextModelWithProjection", "FlaxCLIPVisionModel"):
            setattr(transformers, name, getattr(m["clip"], name))
        for pkg, cls in (("stable_diffusion", "FlaxStableDiffusionPipelineOutput"),
                         ("stable_diffusion_xl", "FlaxStableDiffusionXLPipelineOutput")):
            out = importlib.import_module(f"diffusers.pipelines.{pkg}.pipeline_output")
            if not hasattr(out, cls):
                importlib.reload(out)  # re-runs its `if is_flax_available():` block
    sd = importlib.import_module("diffusers.pipelines.stable_diffusion.pipeline_flax_stable_diffusion")
    xl = importlib.import_module("diffusers.pipelines.stable_diffusion_xl.pipeline_flax_stable_diffusion_xl")
    api.FlaxStableDiffusionPipeline = sd.FlaxStableDiffusionPipeline
    api.FlaxStableDiffusionXLPipeline = xl.FlaxStableDiffusionXLPipeline
    api.patched_after_import = flipped
    _API = api
    return api


# --------------------------------------------------------------------------------------------------
# Components with seeded random parameters
# --------------------------------------------------------------------------------------------------


def _count(tree) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def _components(preset: Preset, split_head_dim: bool):
    """Modules (no parameters yet) and a ``{name: init_fn(rng) -> params}`` table."""
    from transformers import CLIPTextConfig

    api = flax_api()
    with _quiet_deprecations():
        unet = api.FlaxUNet2DConditionModel.from_config(dict(preset.unet), split_head_dim=split_head_dim)
        vae = api.FlaxAutoencoderKL.from_config(dict(preset.vae))
        text_encoder = api.FlaxCLIPTextModel(CLIPTextConfig(**preset.text_encoder), _do_init=False)
        modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
        if preset.is_xl:
            modules["text_encoder_2"] = api.FlaxCLIPTextModelWithProjection(
                CLIPTextConfig(**preset.text_encoder_2), _do_init=False
            )
    inits = {
        "unet": lambda rng: unet.init_weights(rng),
        "vae": lambda rng: vae.init_weights(rng),
        "text_encoder": lambda rng: text_encoder.init_weights(rng, (1, 77)),
    }
    if preset.is_xl:
        inits["text_encoder_2"] = lambda rng: modules["text_encoder_2"].init_weights(rng, (1, 77))
    return modules, inits


def parameter_counts(preset: Preset, split_head_dim: bool = False) -> dict[str, int]:
    """Each Flax component's parameter count from ``jax.eval_shape`` (nothing is allocated)."""
    _, inits = _components(preset, split_head_dim)
    rng = jax.random.PRNGKey(0)
    return {name: _count(jax.eval_shape(fn, rng)) for name, fn in inits.items()}


def _scheduler(preset: Preset):
    api = flax_api()
    cls = api.FlaxEulerDiscreteScheduler if preset.is_xl else api.FlaxPNDMScheduler
    with _quiet_deprecations():  # also silences "config attributes ... will be ignored" (e.g. steps_offset)
        scheduler = cls.from_config(dict(preset.scheduler))
    return scheduler, scheduler.create_state()


def _random_leaf(path: tuple, shape: tuple, rng: np.random.Generator, dtype) -> np.ndarray:
    """Flax's default initializers, drawn with numpy: zero biases, unit norm scales, lecun-normal kernels."""
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "bias":
        return np.zeros(shape, dtype)
    if name == "scale":
        return np.ones(shape, dtype)
    if name == "embedding" or len(shape) < 2:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
    fan_in = int(np.prod(shape[:-1]))
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(dtype)


def random_params(inits: dict, seed: int, dtype: str, put) -> dict:
    """Seeded random parameters with the exact shapes of each component's ``init_weights`` (via ``eval_shape``).

    Note: ``jax.jit(init_weights)`` costs minutes of XLA compilation on a CPU even for the tiny preset, so the
    tree is drawn leaf by leaf with numpy (the distributions of Flax's defaults), cast to the recipe's dtype
    on the host and handed to ``put`` (which places or replicates it) one leaf at a time, so the host never
    holds more than one float32 leaf beyond the result.
    """
    import ml_dtypes

    target = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16}[dtype]
    out = {}
    for i, (name, fn) in enumerate(inits.items()):
        shapes = jax.eval_shape(fn, jax.random.PRNGKey(0))
        rng = np.random.default_rng([seed, i])
        out[name] = jax.tree_util.tree_map_with_path(lambda p, s: put(_random_leaf(p, s.shape, rng, target)), shapes)
    return out


def random_pipeline(preset: Preset, seed: int, split_head_dim: bool, dtype: str = "fp32", put=jnp.asarray):
    """The preset's architecture as a Flax pipeline plus seeded random params in ``dtype`` (``fp32``/``bf16``).

    The scheduler state always stays float32 (upstream: a bf16 scheduler state degrades the output too much).
    """
    api = flax_api()
    modules, inits = _components(preset, split_head_dim)
    params = random_params(inits, seed, dtype, put)
    scheduler, scheduler_state = _scheduler(preset)
    params["scheduler"] = jax.tree_util.tree_map(lambda x: put(np.asarray(x)), scheduler_state)
    with _quiet_deprecations():
        if preset.is_xl:
            pipe = api.FlaxStableDiffusionXLPipeline(
                text_encoder=modules["text_encoder"], text_encoder_2=modules["text_encoder_2"], vae=modules["vae"],
                tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"), unet=modules["unet"],
                scheduler=scheduler,
            )
        else:
            pipe = api.FlaxStableDiffusionPipeline(
                vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=clip_tokenizer(),
                unet=modules["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
            )
    return pipe, params


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------


class JaxDeviceMemory(MemoryProbe):
    """Allocator peak (``memory_stats()['peak_bytes_in_use']``) summed over the devices used, and what kind it is.

    Note: JAX offers no way to reset a device's peak, so :meth:`reset` records it. When a phase raised the
    peak, the new peak is that phase's own (``kind`` ``jax-peak``); when it did not (an earlier, larger case
    set it), the phase's own peak is unknown and the bytes in use after it stand in as a lower bound (``kind``
    ``jax-in-use-lower-bound``); a device without allocator statistics gives ``None`` (``unavailable``).
    Exact peaks for every case: one process per case (``python -m diffperf launch --group case``).
    """

    KINDS = ("jax-peak", "jax-in-use-lower-bound", "unavailable")

    def __init__(self, devices):
        self.devices = list(devices)
        self._at_reset = 0
        self.kind = "jax-peak"

    def _stat(self, key: str) -> int | None:
        stats = [d.memory_stats() or {} for d in self.devices]
        if not all(key in st for st in stats):
            return None
        return int(sum(st[key] for st in stats))

    def reset(self) -> None:
        self._at_reset = self._stat("peak_bytes_in_use") or 0

    def peak_bytes(self) -> int | None:
        peak = self._stat("peak_bytes_in_use")
        if peak is None:
            self.kind = "unavailable"
            return None
        if peak > self._at_reset:
            self.kind = "jax-peak"
            return peak
        self.kind = "jax-in-use-lower-bound"
        return self._stat("bytes_in_use")


def replicate(x: np.ndarray, devices: list) -> jax.Array:
    """``x`` with a leading device axis, one copy per device, laid out as ``pmap`` expects (no host stack)."""
    x = np.asarray(x)
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    return jax.make_array_from_callback((len(devices), *x.shape), sharding, lambda _: x[None])


def _rounded(ev: dict) -> dict:
    return {k: round(v, 4) for k, v in ev.items()}


def _skip(reason: str):
    import pytest

    pytest.skip(reason)


def select_devices(case: Case) -> list:
    """The devices ``case`` runs on, or a pytest skip saying why this machine cannot run it."""
    recipe: FlaxRecipe = case.recipe
    platform = PLATFORMS[case.device]
    try:
        devices = jax.local_devices(backend=platform)
    except RuntimeError:
        devices = []
    if not devices:
        _skip(f"jax has no {platform} backend here (backends: {jax.default_backend()}); "
              f"install jax[{'cuda12' if platform == 'gpu' else 'tpu'}] or run with -m cpu")
    n = recipe.devices or len(devices)
    if n > len(devices):
        hint = " (test multi-device code on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N)" \
            if platform == "cpu" else ""
        _skip(f"{recipe.tag()} needs {n} {platform} devices, jax sees {len(devices)}{hint}")
    if recipe.mode == "jit" and jax.default_backend() != platform:
        _skip(f"the pipeline's own jit pmaps over JAX's default backend ({jax.default_backend()}), not {platform}; "
              f"use the aot mode or JAX_PLATFORMS={platform}")
    return devices[:n]


class FlaxRunner(Runner):
    """A built Flax pipeline; ``generate()`` returns ``devices * batch_size`` images, device by device."""

    def __init__(self, case: Case, pipe, p_params: dict, devices: list, build_info: dict):
        self.case = case
        self.recipe: FlaxRecipe = case.recipe
        self.preset = get_preset(case.preset)
        self.pipe = pipe
        self.devices = devices
        self.n = len(devices)
        self.p_params = p_params  # replicated: every leaf has a leading device axis
        self.memory: MemoryProbe = RSSProbe() if devices[0].platform == "cpu" else JaxDeviceMemory(devices)
        self._info: dict[str, Any] = dict(build_info)
        self._calls: list[float] = []
        self._p_generate = None
        self._instr = None
        self._uncond_ids = None
        self._neg_ids = None
        base = jax.random.PRNGKey(case.seed)
        self._rngs = np.stack([np.asarray(jax.random.fold_in(base, i)) for i in range(self.n)])
        if self.recipe.mode == "aot":
            self._compile_aot()

    # inputs ---------------------------------------------------------------------------------------

    def _shard(self, x: np.ndarray) -> np.ndarray:
        return np.broadcast_to(x, (self.n, *x.shape)).copy()

    def _inputs(self):
        """Tokenized prompt ids, per-device keys and guidance, each with a leading device axis.

        Device ``i`` draws from ``fold_in(PRNGKey(seed), i)`` (not ``split(key, n)[i]``), so device 0's key
        does not depend on the device count and matches the one-device reference.
        """
        ids = np.asarray(self.pipe.prepare_inputs([self.case.prompt] * self.case.batch_size))
        guidance = np.full((self.n, 1), self.case.guidance_scale, dtype=np.float32)
        return self._shard(ids), self._rngs, guidance

    def _negative_ids(self):
        """The negative prompt's ids with a leading device axis, or ``None`` (the pipeline's own unconditional
        input: the empty prompt for SD 1.5, zero embeddings for SDXL)."""
        if not self.case.negative_prompt:
            return None
        if self._neg_ids is None:
            ids = self.pipe.prepare_inputs([self.case.negative_prompt] * self.case.batch_size)
            self._neg_ids = self._shard(np.asarray(ids))
        return self._neg_ids

    @property
    def _static(self) -> tuple:
        return (self.case.steps, self.case.height, self.case.width)

    # modes ----------------------------------------------------------------------------------------

    def _compile_aot(self) -> None:
        ids, rngs, guidance = self._inputs()
        xl = self.preset.is_xl
        static = (3, 4, 5, 9) if xl else (3, 4, 5)
        extra = (False,) if xl else ()  # return_latents
        fn = jax.pmap(self.pipe._generate, static_broadcasted_argnums=static, devices=self.devices)
        with progress.step(f"AOT lower+compile {self.case.id} on {self.n} device(s)"), compile_events() as ev:
            t0 = time.perf_counter()
            lowered = fn.lower(ids, self.p_params, rngs, *self._static, guidance, None, self._negative_ids(), *extra)
            t1 = time.perf_counter()
            self._p_generate = lowered.compile()
            t2 = time.perf_counter()
        # ahead_of_time_compile_s: the seed's "Compiled in" figure, paid at build, so not in the cold start.
        self._info.update(aot_lower_s=t1 - t0, aot_compile_s=t2 - t1, compile_s=t2 - t0, ahead_of_time_compile_s=t2 - t0,
                          aot_persistent_cache_hits=int(ev["cache_hits"]), compile_events=_rounded(ev))

    def _run(self):
        ids, rngs, guidance = self._inputs()
        if self.recipe.mode == "aot":
            images = self._p_generate(ids, self.p_params, rngs, guidance, None, self._negative_ids())
        else:
            kw = dict(output_type=None) if self.preset.is_xl else {}
            images = self.pipe(ids, self.p_params, rngs, num_inference_steps=self.case.steps, height=self.case.height,
                               width=self.case.width, guidance_scale=guidance, neg_prompt_ids=self._negative_ids(),
                               jit=True, return_dict=False, **kw)[0]
        return jax.block_until_ready(images)

    @staticmethod
    def _to_uint8(images) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        images = images.reshape(-1, *images.shape[-3:])
        return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def synchronize(self) -> None:
        """Nothing to wait for: ``generate()`` blocks on its outputs (``jax.block_until_ready``) itself."""

    def generate(self) -> Generation:
        t0 = time.perf_counter()
        if not self._calls:
            with compile_events() as ev:
                images = self._run()
            self._info.update(first_call_compile_s=ev["compile_s"],
                              first_call_persistent_cache_hits=int(ev["cache_hits"]))
            if self.recipe.mode == "jit":
                self._info.update(compile_s=ev["compile_s"], compile_events=_rounded(ev))
        else:
            images = self._run()
        out = Generation(self._to_uint8(images))
        self._calls.append(time.perf_counter() - t0)
        return out

    # instrumented path ----------------------------------------------------------------------------

    def _instrumented_fns(self):
        """Three pmapped pieces mirroring ``_generate``: encode (+ initial latents), one step, decode."""
        pipe, xl, (steps, h, w) = self.pipe, self.preset.is_xl, self._static
        latent_shape = (self.case.batch_size, pipe.unet.config.in_channels, h // pipe.vae_scale_factor,
                        w // pipe.vae_scale_factor)

        negative = self.case.negative_prompt is not None

        def encode(ids, uncond_ids, params, rng):
            added = None
            if xl:
                emb, pooled = pipe.get_embeddings(ids, params)
                add_time = pipe._get_add_time_ids((h, w), (0, 0), (h, w), emb.shape[0], dtype=emb.dtype)
                if negative:  # as _generate: two more text-encoder passes
                    neg_emb, neg_pooled = pipe.get_embeddings(uncond_ids, params)
                else:
                    neg_emb, neg_pooled = jnp.zeros_like(emb), jnp.zeros_like(pooled)
                context = jnp.concatenate([neg_emb, emb])
                added = {"text_embeds": jnp.concatenate([neg_pooled, pooled]),
                         "time_ids": jnp.concatenate([add_time, add_time])}
            else:
                emb = pipe.text_encoder(ids, params=params["text_encoder"])[0]
                neg = pipe.text_encoder(uncond_ids, params=params["text_encoder"])[0]
                context = jnp.concatenate([neg, emb])
            latents = jax.random.normal(rng, shape=latent_shape, dtype=jnp.float32)
            state = pipe.scheduler.set_timesteps(params["scheduler"], num_inference_steps=steps, shape=latent_shape)
            init_sigma = (state if xl else params["scheduler"]).init_noise_sigma
            return context, added, latents * init_sigma, state

        def step(i, latents, state, context, added, guidance, params):
            t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
            x = pipe.scheduler.scale_model_input(state, jnp.concatenate([latents] * 2), t)
            kw = {"added_cond_kwargs": added} if xl else {}
            noise = pipe.unet.apply({"params": params["unet"]}, x, jnp.broadcast_to(t, x.shape[0]),
                                    encoder_hidden_states=context, **kw).sample
            uncond, text = jnp.split(noise, 2, axis=0)
            noise = uncond + jnp.array([guidance], dtype=jnp.float32) * (text - uncond)
            return pipe.scheduler.step(state, noise, t, latents).to_tuple()

        def decode(latents, params):
            image = pipe.vae.apply({"params": params["vae"]}, latents / pipe.vae.config.scaling_factor,
                                   method=pipe.vae.decode).sample
            return (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)

        pm = lambda f: jax.pmap(f, devices=self.devices)  # noqa: E731
        return pm(encode), pm(step), pm(decode)

    def generate_instrumented(self) -> tuple[Generation, Breakdown]:
        """Encode, each denoising step and decode as separate pmapped programs, each synchronized.

        The headline ``_generate`` is one program with a ``fori_loop`` inside, so it has no host-visible step
        boundary; timing ``return_latents=True`` against the full call would give the decode but no per-step
        times (and SD 1.5's ``_generate`` has no ``return_latents``). The three pieces are compiled and run once
        on the first call, untimed, so the breakdown holds no compile time. The returned Generation is device
        0's share (the seed of the one-device reference), with the final latents, for the fidelity check.
        """
        ids, rngs, guidance = self._inputs()
        if self._uncond_ids is None:
            self._uncond_ids = self._negative_ids()
            if self._uncond_ids is None:
                uncond = self.pipe.tokenizer([""] * self.case.batch_size, padding="max_length",
                                             max_length=ids.shape[-1], return_tensors="np").input_ids
                self._uncond_ids = self._shard(np.asarray(uncond))
        if self._instr is None:
            self._instr = self._instrumented_fns()
            with progress.step(f"compiling the instrumented pieces of {self.case.id}"), compile_events() as ev:
                self._run_pieces(ids, rngs, guidance, None, warmup=True)
            self._info["instrumented_compile_s"] = ev["compile_s"]
        clock = StepClock(self.synchronize)
        images, latents = self._run_pieces(ids, rngs, guidance, clock)
        out = Generation(self._to_uint8(images[:1]), np.asarray(latents[0], dtype=np.float32))
        return out, clock.breakdown()

    def _run_pieces(self, ids, rngs, guidance, clock: StepClock | None, warmup: bool = False):
        encode, step, decode = self._instr
        mark = (lambda label, *xs: (jax.block_until_ready(xs), clock.mark(label))) if clock else (lambda *a: None)
        mark("start")
        context, added, latents, state = encode(ids, self._uncond_ids, self.p_params, rngs)
        mark("encode_end", context, latents)
        g = guidance[:, 0]
        for i in range(1 if warmup else self.case.steps):
            latents, state = step(np.full((self.n,), i, np.int32), latents, state, context, added, g, self.p_params)
            mark("step", latents)
        mark("decode_start")
        images = jax.block_until_ready(decode(latents, self.p_params))
        mark("decode_end", images)
        latents, images = np.asarray(latents), np.asarray(images)
        mark("end")
        return images, latents

    # reporting ------------------------------------------------------------------------------------

    def compile_info(self) -> dict[str, Any]:
        """Compile figures and the scaling figures: devices, images per call and images/s of the best call.

        ``compile_s`` is AOT lower+compile at build (``aot`` mode, also as ``ahead_of_time_compile_s``) or the
        compile JAX did inside the first call (``jit`` mode); ``first_call_compile_s`` is what the first ``generate()`` still compiled (~0 with AOT).
        ``compile_events`` splits it into tracing, lowering to MLIR and the XLA backend compile, the only part
        a persistent-cache hit (``*_persistent_cache_hits``) saves.
        """
        info = dict(self._info)
        per_call = self.n * self.case.batch_size
        info.update(devices=self.n, platform=self.devices[0].platform, mode=self.recipe.mode,
                    param_dtype=self.recipe.dtype, split_head_dim=self.recipe.split_head_dim,
                    images_per_call=per_call, calls=len(self._calls))
        steady = self._calls[1:]
        if steady:
            best = min(steady)
            info.update(best_call_s=best, images_per_s=per_call / best, images_per_s_per_device=per_call / best / self.n)
        return info

    def close(self) -> None:
        self.p_params = self._p_generate = self._instr = self.pipe = None
        gc.collect()
        jax.clear_caches()


def build(case: Case) -> FlaxRunner:
    """Build the Flax pipeline ``case`` describes (random parameters; AOT-compiled in ``aot`` mode)."""
    recipe = case.recipe
    assert isinstance(recipe, FlaxRecipe)
    if case.weights:
        _skip("the JAX stack builds from presets with random parameters only (no local Flax weights loader)")
    devices = select_devices(case)
    preset = get_preset(case.preset)
    info: dict[str, Any] = {"persistent_cache_dir": str(cache_dir())}
    put = functools.partial(replicate, devices=devices)
    with progress.step(f"building {preset.name} (Flax, {recipe.dtype} params) with seeded random parameters"):
        t0 = time.perf_counter()
        pipe, p_params = random_pipeline(preset, case.seed, recipe.split_head_dim, recipe.dtype, put)
        jax.block_until_ready(p_params)
        info["init_s"] = time.perf_counter() - t0
    counts = {k: _count(v) // len(devices) for k, v in p_params.items() if k != "scheduler"}
    info["param_counts"] = counts
    for name, expected in preset.expected_params.items():
        if name in counts and counts[name] != expected:
            info.setdefault("param_count_mismatch", {})[name] = {"flax": counts[name], "expected": expected}
    return FlaxRunner(case, pipe, p_params, devices, info)
