"""The PyTorch builder on the tiny preset: build, determinism, breakdown, local weights, global state."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch stack is not installed: pip install -e '.[torch]'")

from diffperf.api import build_pipeline, make_case  # noqa: E402
from pipelines import torch_diffusers as td  # noqa: E402


@pytest.fixture(scope="module")
def fp32_runner():
    runner = build_pipeline("fp32-classic", preset="tiny", steps=2)
    yield runner
    runner.close()


def test_generate_is_deterministic_uint8(fp32_runner):
    a = fp32_runner.generate().images
    b = fp32_runner.generate().images
    assert a.dtype == np.uint8 and a.shape == (1, 64, 64, 3)
    assert np.array_equal(a, b)


def test_instrumented_call_matches_and_breaks_down(fp32_runner):
    plain = fp32_runner.generate().images
    gen, breakdown = fp32_runner.generate_instrumented()
    assert np.array_equal(gen.images, plain), "instrumentation changed the output"
    assert gen.latents.shape == (1, 4, 16, 16)
    # PNDM (PLMS) runs one extra warm-up step: the loop length is the scheduler's timesteps.
    assert len(breakdown.step_s) == len(fp32_runner.pipe.scheduler.timesteps)
    parts = breakdown.text_encode_s + breakdown.denoise_s + breakdown.decode_s
    assert 0 < parts <= breakdown.total_s
    # the wrappers are gone afterwards
    assert "encode_prompt" not in vars(fp32_runner.pipe) and "decode" not in vars(fp32_runner.pipe.vae)


def test_a_bf16_case_starts_from_its_fp32_references_noise(fp32_runner, monkeypatch):
    """bf16 draws its initial noise as the fp32 reference does, whatever torch's bf16 sampler does.

    diffusers draws the noise in the pipeline's dtype. With torch 2.11 (cu130, on an H200) every bf16 case
    failed its fidelity test with a latent cosine of about 0 (0.003 on tiny, 0.026 on SDXL): torch's CPU
    sampler built bf16 normals from other bits than float32 ones (pytorch#166853, diffusers#11056). torch
    2.13 rounds the float32 draw, so here the old sampler is stood in for: a bf16 or fp16 draw that takes
    its numbers from further down the generator's stream.
    """
    from diffperf import fidelity

    real_randn = torch.randn

    def old_sampler(*args, dtype=None, generator=None, **kwargs):
        if dtype in (torch.bfloat16, torch.float16):
            real_randn(*args, generator=generator, **kwargs)  # numbers unrelated to a float32 draw's
            return real_randn(*args, generator=generator, **kwargs).to(dtype)
        return real_randn(*args, dtype=dtype, generator=generator, **kwargs)

    monkeypatch.setattr(torch, "randn", old_sampler)
    runner = build_pipeline("bf16-classic", preset="tiny", steps=2)
    try:
        noise = runner.initial_latents(torch.Generator("cpu").manual_seed(runner.case.seed))
        gen = runner.generate_instrumented()[0]
    finally:
        runner.close()
    ref_noise = fp32_runner.initial_latents(torch.Generator("cpu").manual_seed(fp32_runner.case.seed))
    assert noise.dtype == torch.bfloat16 and ref_noise.dtype == torch.float32
    assert torch.equal(noise, ref_noise.to(torch.bfloat16))
    ref = fp32_runner.generate_instrumented()[0]
    result = fidelity.compare(gen.images, gen.latents, ref.images, ref.latents,
                              runner.case.recipe.fidelity_thresholds())
    assert result.ok, result.message(runner.case.id)


def test_sdpa_and_batch_size():
    runner = build_pipeline("fp32-sdpa", preset="tiny", steps=2, batch_size=2)
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0

        assert all(isinstance(p, AttnProcessor2_0) for p in runner.pipe.unet.attn_processors.values())
        assert runner.generate().images.shape == (2, 64, 64, 3)
    finally:
        runner.close()


def test_int8_dynamic_quant_applies_the_guides_filters():
    runner = build_pipeline("bf16-sdpa-cl-fuseqkv-int8dq", preset="tiny", steps=1)
    try:
        linears = [m for m in runner.pipe.unet.modules() if isinstance(m, torch.nn.Linear)]
        quantized = [m for m in linears if type(m.weight).__name__ != "Parameter"]
        assert quantized, "no linear layer was quantized"
        assert all(m.in_features > 16 for m in quantized)
        out = runner.generate().images
        assert out.shape == (1, 64, 64, 3)
    finally:
        runner.close()


def test_compile_step_restores_inductor_config_on_close():
    import torch._inductor.config as cfg

    before = cfg.coordinate_descent_tuning
    runner = build_pipeline("fp32-sdpa-compile", preset="tiny", steps=1)
    assert cfg.coordinate_descent_tuning is True and cfg.epilogue_fusion is False
    runner.close()
    assert cfg.coordinate_descent_tuning == before and cfg.epilogue_fusion is True


def test_local_weights_round_trip(tmp_path, fp32_runner):
    folder = tmp_path / "tiny-pipeline"
    fp32_runner.pipe.save_pretrained(folder, safe_serialization=True)
    assert list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    assert td.preset_of_folder(folder) == "tiny"
    case = make_case("fp32-classic", preset="tiny", steps=2, weights=str(folder))
    loaded = build_pipeline(case)
    try:
        assert np.array_equal(loaded.generate().images, fp32_runner.generate().images)
    finally:
        loaded.close()


def test_pickle_only_folder_is_refused(tmp_path, fp32_runner):
    folder = tmp_path / "pickled"
    fp32_runner.pipe.save_pretrained(folder, safe_serialization=False)
    with pytest.raises(ValueError, match="only pickle weights .*diffperf loads safetensors only"):
        td.load_local_pipeline(folder, torch.float32)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        td.load_local_pipeline(tmp_path, torch.float32)


def test_perf_weights_option_runs_the_saved_pipeline(fp32_runner, pytester):
    folder = pytester.path / "w"  # inside the run's rootdir (pytest derives the rootdir from path-like args)
    fp32_runner.pipe.save_pretrained(folder, safe_serialization=True)
    from tests.conftest import REPO

    (pytester.path / "test_perf.py").write_text((REPO / "perf" / "test_pipelines.py").read_text())
    pytester.makeini("[pytest]\naddopts = -p diffperf.plugin --strict-markers\n")
    result = pytester.runpytest_subprocess(
        "--perf-frameworks", "torch", "--perf-recipes", "torch:fp32-classic", "--perf-weights", str(folder),
        "--perf-steps", "2", "--perf-rounds", "2", "--perf-warmup-rounds", "0", "-m", "cpu",
        "--benchmark-json", "out.json",
    )
    result.assert_outcomes(passed=2)
    bench = json.loads((pytester.path / "out.json").read_text())["benchmarks"][0]
    assert bench["extra_info"]["case"]["weights"] == str(folder.resolve())


# --------------------------------------------------------------------------------------------------
# Issue 14: global state between cases (inductor config, dynamo counters), int8wo's filters, fp8 gate
# --------------------------------------------------------------------------------------------------

# The keys the guide's flags and torchao's "recommended" setter write; set to False first, so a write shows.
_WATCHED = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul",
            "fx_graph_cache", "conv_1x1_as_mm", "epilogue_fusion", "triton.unique_kernel_names")


@pytest.fixture
def watched_inductor_config():
    import torch._inductor.config as cfg

    original = cfg.get_config_copy()
    cfg.load_config({key: False for key in _WATCHED})
    yield cfg
    cfg.load_config(original)


@pytest.mark.parametrize("tag", ["bf16-sdpa-cl-int8dq", "bf16-sdpa-cl-int8wo", "bf16-sdpa-compile-int8dq"])
def test_quantized_case_restores_the_whole_inductor_config(watched_inductor_config, tag):
    cfg = watched_inductor_config
    before = cfg.get_config_copy()
    runner = build_pipeline(tag, preset="tiny", steps=1)
    try:
        during = cfg.get_config_copy()
        if runner.case.recipe.compile_mode is None:  # eager: nothing to tune, nothing changed
            assert during == before
        else:  # the guide's flags (and its quantization flags), not torchao's own
            for key, value in {**td.INDUCTOR_FLAGS, "force_fuse_int_mm_with_mul": True}.items():
                assert during[key] == value, key
            changed = {k for k, v in during.items() if before[k] != v}
            assert changed <= set(td.INDUCTOR_FLAGS) | set(td.INDUCTOR_QUANT_FLAGS), changed  # none of torchao's
    finally:
        runner.close()
    after = cfg.get_config_copy()
    assert {k: v for k, v in after.items() if before[k] != v} == {}


def test_dynamo_counters_are_the_cases_own():
    from torch._dynamo.utils import counters

    counters["graph_break"]["an earlier case's break"] += 3
    counters["stats"]["unique_graphs"] += 5
    runner = build_pipeline("fp32-sdpa-compiledefault", preset="tiny", steps=1)
    try:
        info = runner.compile_info()
        # nothing has been compiled yet (torch.compile is lazy): the earlier case's counts must not show
        assert info["dynamo_graph_breaks"] == 0 and info["dynamo_unique_graphs"] == 0
    finally:
        runner.close()


def test_int8_weight_only_gets_the_guides_conv_swap_and_filter():
    runner = build_pipeline("bf16-sdpa-cl-int8wo", preset="tiny", steps=1)
    try:
        unet = runner.pipe.unet
        assert not any(td.conv_filter_fn(m) for m in unet.modules()), "the guide's 1x1 convs were not swapped"
        linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
        quantized = [m for m in linears if type(m.weight).__name__ != "Parameter"]
        assert quantized and all(td.dynamic_quant_filter_fn(m) for m in quantized)
        assert [m for m in quantized if m.in_features == 128 or m.out_features == 128]  # the swapped conv too
    finally:
        runner.close()


def test_fp8_skips_below_compute_capability_8_9_at_build(monkeypatch):
    """Collection gates on nvidia-smi; build asks torch again (fake CUDA device of capability 8.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(pytest.skip.Exception, match=r"compute capability >= 8.9.*this one is 8.0"):
        build_pipeline(make_case("bf16-sdpa-cl-compile-fp8dq", preset="tiny", steps=1, device="cuda"))
