"""The PyTorch builder: a diffusers pipeline from a preset (random weights) or a local folder, with the
optimization steps of a :class:`~pipelines.torch_recipes.TorchRecipe` applied in the guide's order:

precision -> attention processor -> fused QKV -> channels_last -> torchao quantization -> torch.compile.

Each step is a small function of ``(pipe, recipe)``; :func:`build` composes them. Global state the steps
change (inductor config, dynamo caches, matmul precision) is restored by :meth:`TorchRunner.close`.

Note: :func:`build` snapshots the whole inductor config before any step and :meth:`TorchRunner.close` loads
it back, so nothing a case sets (the guide's flags, or anything a library sets behind our back) leaks into
later cases. torchao's configs are given ``set_inductor_config=False``: their own "recommended" flags
(``fx_graph_cache``, ``unique_kernel_names``...) are not the guide's; :func:`step_compile` sets the guide's.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, Callable

# diffusers/transformers' TensorFlow classes are never used; Flax is left alone so that the JAX stack can
# share the process (the plugin turns it off when no JAX case is selected, which speeds imports up).
os.environ.setdefault("USE_TF", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffperf import hardware, progress  # noqa: E402
from diffperf.cases import Case  # noqa: E402
from diffperf.memory import RSSProbe  # noqa: E402
from diffperf.presets import Preset, get_preset  # noqa: E402
from diffperf.tokenizer import clip_tokenizer  # noqa: E402
from pipelines.base import Breakdown, Generation, MemoryProbe, Runner, StepClock  # noqa: E402
from pipelines.torch_recipes import TorchRecipe  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The inductor flags of the diffusers "accelerate inference" guide.
INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}
INDUCTOR_QUANT_FLAGS = {"force_fuse_int_mm_with_mul": True, "use_mixed_mm": True}

# The guide's layer filters (diffusion-fast, utils/pipeline_utils.py): linear layers too small to win
# from dynamic int8 quantization, and the 1x1 convolutions worth turning into linears.
_DQ_SKIP_SHAPES = frozenset(
    {
        (1280, 640), (1920, 1280), (1920, 640), (2048, 1280), (2048, 2560), (2560, 1280), (256, 128),
        (2816, 1280), (320, 640), (512, 1536), (512, 256), (512, 512), (640, 1280), (640, 1920),
        (640, 320), (640, 5120), (640, 640), (960, 320), (960, 640),
    }
)



# What build() imports lazily (module, names to resolve on it): the harness imports them before the case's
# memory mark (diffperf.memory.preload_stack), so the first torch case does not count the stack's code.
PRELOAD = (
    ("diffusers", ("AutoencoderKL", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "UNet2DConditionModel",
                   "EulerDiscreteScheduler", "PNDMScheduler", "DiffusionPipeline")),
    ("diffusers.models.attention_processor", ("AttnProcessor", "AttnProcessor2_0")),
    ("transformers", ("CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection")),
    ("torchao.quantization", ()),
    ("torch._inductor.config", ()),
)

def dynamic_quant_filter_fn(mod: torch.nn.Module, *args: Any) -> bool:
    return (
        isinstance(mod, torch.nn.Linear)
        and mod.in_features > 16
        and (mod.in_features, mod.out_features) not in _DQ_SKIP_SHAPES
    )


def conv_filter_fn(mod: torch.nn.Module, *args: Any) -> bool:
    return (
        isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1) and 128 in (mod.in_channels, mod.out_channels)
    )


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


def _scheduler(preset: Preset):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    cls = EulerDiscreteScheduler if preset.is_xl else PNDMScheduler
    return cls.from_config(dict(preset.scheduler))


def random_pipeline(preset: Preset, seed: int, device: str):
    """The preset's real architecture with seeded random weights, in float32, on ``device``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(dict(preset.unet))
        vae = AutoencoderKL.from_config(dict(preset.vae))
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
        if preset.is_xl:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2))
    if preset.is_xl:
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=_scheduler(preset),
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=_scheduler(preset),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_local_pipeline(folder: str | os.PathLike[str], dtype: torch.dtype):
    """Load a diffusers pipeline folder from disk: safetensors only (never pickle), no network."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"--perf-weights {folder}: not a diffusers pipeline folder (no model_index.json)")
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pkl"))
    if pickles and not any(folder.rglob("*.safetensors")):
        raise ValueError(f"--perf-weights {folder}: only pickle weights ({', '.join(pickles)}); diffperf loads safetensors only")
    kwargs = {}
    if (folder / "safety_checker").exists():
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True, **kwargs
    )


def preset_of_folder(folder: str | os.PathLike[str]) -> str:
    """The preset whose UNet the folder's matches (channels and cross-attention width), else by class name."""
    import json

    from diffperf.presets import PRESETS

    folder = Path(folder)
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file():
        cfg = json.loads(unet_config.read_text())
        for preset in PRESETS.values():
            if all(list(cfg.get(k) or []) == list(preset.unet[k]) if isinstance(preset.unet[k], (list, tuple))
                   else cfg.get(k) == preset.unet[k] for k in ("block_out_channels", "cross_attention_dim")):
                return preset.name
    index = json.loads((folder / "model_index.json").read_text())
    return "sdxl" if "XL" in index.get("_class_name", "") else "sd15"


# --------------------------------------------------------------------------------------------------
# Optimization steps: each takes (pipe, recipe, state) and changes pipe in place.
# --------------------------------------------------------------------------------------------------


def step_attention(pipe, recipe: TorchRecipe, state: dict) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    proc = AttnProcessor if recipe.attention == "classic" else AttnProcessor2_0
    pipe.unet.set_attn_processor(proc())
    pipe.vae.set_attn_processor(proc())


def step_fuse_qkv(pipe, recipe: TorchRecipe, state: dict) -> None:
    if recipe.fuse_qkv:
        pipe.fuse_qkv_projections()


def step_channels_last(pipe, recipe: TorchRecipe, state: dict) -> None:
    if recipe.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)


def step_quantize(pipe, recipe: TorchRecipe, state: dict) -> None:
    if recipe.quant is None:
        return
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )
    from torchao.quantization.quant_api import swap_conv2d_1x1_to_linear

    # The guide's conv swap and layer filter for every quantization (int8wo and fp8dq are not in the guide).
    config = {
        "int8dq": lambda: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        "int8wo": lambda: Int8WeightOnlyConfig(set_inductor_config=False),
        "fp8dq": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
    }[recipe.quant]
    for model in (pipe.unet, pipe.vae):
        swap_conv2d_1x1_to_linear(model, conv_filter_fn)
        quantize_(model, config(), filter_fn=dynamic_quant_filter_fn)


def step_compile(pipe, recipe: TorchRecipe, state: dict) -> None:
    if recipe.compile_mode is None:
        return
    import torch._inductor.config as inductor_config

    flags = dict(INDUCTOR_FLAGS)
    if recipe.quant is not None:
        flags.update(INDUCTOR_QUANT_FLAGS)
    for key, value in flags.items():  # build() saved the whole config; close() loads it back
        if hasattr(inductor_config, key):
            setattr(inductor_config, key, value)
    pipe.unet = torch.compile(pipe.unet, mode=recipe.compile_mode, fullgraph=recipe.fullgraph)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=recipe.compile_mode, fullgraph=recipe.fullgraph)


STEPS: tuple[Callable[[Any, TorchRecipe, dict], None], ...] = (
    step_attention,
    step_fuse_qkv,
    step_channels_last,
    step_quantize,
    step_compile,
)


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------


class CudaMemory(MemoryProbe):
    kind = "cuda_allocator_peak"

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


class TorchRunner(Runner):
    def __init__(self, case: Case, pipe, device: torch.device, state: dict):
        self.case = case
        self.pipe = pipe
        self.device = device
        self.state = state
        self.memory = CudaMemory(device) if device.type == "cuda" else RSSProbe()
        self.preset = get_preset(case.preset)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def initial_latents(self, generator: torch.Generator) -> torch.Tensor:
        """The initial noise: drawn in float32 from ``generator``, then cast to the recipe's precision.

        Note: diffusers draws it in the pipeline's dtype, and a bf16 draw from torch's CPU sampler is not
        always the float32 draw rounded (pytorch#166853, diffusers#11056): with torch 2.11 on an H200 every
        bf16 case started from noise unrelated to its fp32 reference's, and the fidelity guard compared
        two different images (latent cosine 0.003-0.026). torch 2.13 rounds the float32 draw (bf16 and
        fp16), so this changes nothing there. The draw and the cast stay in the timed call, where diffusers'
        own draw is.
        """
        pipe = self.pipe
        shape = (self.case.batch_size, pipe.unet.config.in_channels,
                 self.case.height // pipe.vae_scale_factor, self.case.width // pipe.vae_scale_factor)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise.to(device=self.device, dtype=DTYPES[self.case.recipe.precision])

    def _call(self, **extra):
        generator = torch.Generator("cpu").manual_seed(self.case.seed)
        with torch.inference_mode():
            return self.pipe(
                prompt=self.case.prompt,
                num_images_per_prompt=self.case.batch_size,
                num_inference_steps=self.case.steps,
                height=self.case.height,
                width=self.case.width,
                generator=generator,
                latents=self.initial_latents(generator),
                output_type="np",
                **extra,
            ).images

    @staticmethod
    def _to_uint8(images: np.ndarray) -> np.ndarray:
        return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)

    def generate(self) -> Generation:
        return Generation(self._to_uint8(self._call()))

    def generate_instrumented(self) -> tuple[Generation, Breakdown]:
        clock = StepClock(self.synchronize)
        pipe = self.pipe
        captured: dict = {}
        encode, decode = pipe.encode_prompt, pipe.vae.decode

        def timed_encode(*args, **kwargs):
            out = encode(*args, **kwargs)
            clock.mark("encode_end")
            return out

        def timed_decode(latents, *args, **kwargs):
            clock.mark("decode_start")
            captured["latents"] = latents.detach().float().cpu().numpy()
            out = decode(latents, *args, **kwargs)
            clock.mark("decode_end")
            return out

        def on_step_end(_pipe, _i, _t, callback_kwargs):
            clock.mark("step")
            return callback_kwargs

        saved = {(obj, name): vars(obj).get(name) for obj, name in ((pipe, "encode_prompt"), (pipe.vae, "decode"))}
        pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode
        try:
            clock.mark("start")
            images = self._call(callback_on_step_end=on_step_end)
            clock.mark("end")
        finally:
            for (obj, name), value in saved.items():  # back to exactly what was there (e.g. a compiled decode)
                if value is None:
                    vars(obj).pop(name, None)
                else:
                    setattr(obj, name, value)
        return Generation(self._to_uint8(images), captured.get("latents")), clock.breakdown()

    def compile_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.case.recipe.compile_mode is not None:
            try:
                from torch._dynamo.utils import counters

                # build() cleared the counters: these are this case's own.
                info["dynamo_graph_breaks"] = int(sum(counters["graph_break"].values()))
                info["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
            except Exception:  # pragma: no cover - private API
                pass
        return info

    def close(self) -> None:
        import torch._inductor.config as inductor_config

        saved = self.state.pop("inductor_config", None)
        if saved is not None:
            inductor_config.load_config(saved)
        self.pipe = None
        gc.collect()
        if self.case.recipe.compile_mode is not None:
            torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def build(case: Case) -> TorchRunner:
    """Build the pipeline ``case`` describes and apply its recipe's optimization steps."""
    recipe = case.recipe
    assert isinstance(recipe, TorchRecipe)
    if case.device == "cuda" and not torch.cuda.is_available():
        import pytest

        pytest.skip("torch has no CUDA support in this environment (CPU-only torch build or no driver)")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the fp32 -> bf16 cast warning is expected here
    device = torch.device("cuda" if case.device == "cuda" else "cpu")
    if recipe.quant == "fp8dq" and device.type == "cuda":
        reason = hardware.fp8_skip_reason(torch.cuda.get_device_capability(device))
        if reason:
            import pytest

            pytest.skip(reason)
    dtype = DTYPES[recipe.precision]
    preset = get_preset(case.preset)
    if case.weights:
        with progress.step(f"loading {case.weights} ({recipe.precision})"):
            pipe = load_local_pipeline(case.weights, dtype)
    else:
        with progress.step(f"building {preset.name} with seeded random weights on {device.type}"):
            pipe = random_pipeline(preset, case.seed, device.type)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    state: dict = {"inductor_config": inductor_config.get_config_copy()}
    counters.clear()  # graph and graph-break counts are per case
    try:
        for step in STEPS:
            step(pipe, recipe, state)
    except BaseException:
        inductor_config.load_config(state["inductor_config"])
        raise
    return TorchRunner(case, pipe, device, state)
