"""Model presets as data: the real SD 1.5 / SDXL architectures and a tiny one for CPU runs.

Each preset is a frozen dataclass holding the diffusers/transformers configs of its components. Builders
in ``pipelines/`` turn them into models with seeded random weights; :func:`parameter_counts` counts the
parameters on the ``meta`` device, so it allocates nothing.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

CLIP_VOCAB_SIZE = 49408  # the real CLIP BPE vocabulary size; token ids must stay below it
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True)
class Preset:
    """One model family at one size: component configs plus its native sampling settings."""

    name: str
    family: str  # "sd15" or "sdxl": which pipeline class runs it
    description: str
    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    text_encoder_2: Mapping[str, Any] | None
    scheduler: Mapping[str, Any]
    height: int
    width: int
    default_steps: int
    guidance_scale: float = 7.5
    # Published parameter counts this preset must reproduce (checked by the harness tests).
    expected_params: Mapping[str, int] = dataclasses.field(default_factory=lambda: _frozen({}))

    @property
    def is_xl(self) -> bool:
        return self.family == "sdxl"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def component_names(self) -> tuple[str, ...]:
        names = ["unet", "vae", "text_encoder"]
        if self.text_encoder_2 is not None:
            names.append("text_encoder_2")
        return tuple(names)


_CLIP_L = _frozen(
    dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=1,
    )
)

_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15 = Preset(
    name="sd15",
    family="sd15",
    description="Stable Diffusion 1.5 (UNet 860M, CLIP ViT-L/14, KL VAE), 512x512",
    unet=_frozen(
        dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    ),
    vae=_frozen(_SD_VAE),
    text_encoder=_CLIP_L,
    text_encoder_2=None,
    scheduler=_frozen(
        dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            set_alpha_to_one=False,
            skip_prk_steps=True,
        )
    ),
    height=512,
    width=512,
    default_steps=30,
    expected_params=_frozen(dict(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863)),
)

SDXL = Preset(
    name="sdxl",
    family="sdxl",
    description="Stable Diffusion XL base 1.0 (UNet 2.6B, CLIP ViT-L + OpenCLIP bigG), 1024x1024",
    unet=_frozen(
        dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[320, 640, 1280],
            layers_per_block=2,
            transformer_layers_per_block=[1, 2, 10],
            attention_head_dim=[5, 10, 20],
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        )
    ),
    vae=_frozen(dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)),
    text_encoder=_CLIP_L,
    text_encoder_2=_frozen(
        dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
            bos_token_id=CLIP_BOS_ID,
            eos_token_id=CLIP_EOS_ID,
            pad_token_id=1,
        )
    ),
    scheduler=_frozen(
        dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            prediction_type="epsilon",
        )
    ),
    height=1024,
    width=1024,
    default_steps=30,
    expected_params=_frozen(
        dict(unet=2_567_463_684, text_encoder=123_060_480, text_encoder_2=694_659_840, vae=83_653_863)
    ),
)

TINY = Preset(
    name="tiny",
    family="sd15",
    description="SD 1.5 layout at toy width (a full pipeline in seconds on 2 CPU cores), 64x64",
    unet=_frozen(
        dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[32, 64],
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    ),
    vae=_frozen(
        dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            block_out_channels=[32, 32, 64],
            layers_per_block=1,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=0.18215,
        )
    ),
    text_encoder=_frozen(
        dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=64,
            bos_token_id=CLIP_BOS_ID,
            eos_token_id=CLIP_EOS_ID,
            pad_token_id=1,
        )
    ),
    text_encoder_2=None,
    scheduler=SD15.scheduler,
    height=64,
    width=64,
    default_steps=4,
)

PRESETS: Mapping[str, Preset] = _frozen({p.name: p for p in (TINY, SD15, SDXL)})


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; raise ``KeyError`` naming the known presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def parameter_counts(preset: Preset) -> dict[str, int]:
    """Count each component's parameters on the meta device (no weight is allocated)."""
    import os

    os.environ.setdefault("USE_TF", "0")
    os.environ.setdefault("USE_FLAX", "0")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    counts: dict[str, int] = {}
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(dict(preset.unet)),
            "vae": AutoencoderKL.from_config(dict(preset.vae)),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**preset.text_encoder)),
        }
        if preset.text_encoder_2 is not None:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2))
    for name, model in models.items():
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts
