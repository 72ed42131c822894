"""CPU tests of the JAX/Flax stack: recipes, the tiny pipeline in jit and AOT modes, bf16 parameters with a
float32 scheduler state, and multi-device code on 4 forced host devices in a subprocess.

The XLA compilations dominate (tens of seconds each on 2 cores the first time); the persistent compilation
cache (``$DIFFPERF_CACHE_DIR/jax``) makes reruns much faster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from diffperf.cases import Case, RecipeError, framework_spec, resolve_recipes
from pipelines.jax_recipes import FlaxRecipe

REPO = Path(__file__).resolve().parent.parent
STEPS = 2


def _needs_stack():
    pytest.importorskip("jax", reason="jax is not installed (the JAX stack needs jax, jaxlib and flax)")
    pytest.importorskip("flax", reason="flax is not installed (the JAX stack needs jax, jaxlib and flax)")
    pytest.importorskip("diffusers", reason="diffusers is not installed")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -- recipes (no framework import) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag", ["fp32-jit", "bf16-jit", "fp32-aot", "bf16-aot-splithead", "bf16-aot-splithead-8dev", "fp32-jit-alldev",
            "bf16-aot-2dev"],
)
def test_recipe_tag_round_trip(tag):
    recipe = FlaxRecipe.from_tag(tag)
    assert recipe.tag() == tag
    assert FlaxRecipe.from_tag(recipe.tag()) == recipe


def test_recipe_fields_from_tag():
    r = FlaxRecipe.from_tag("bf16-aot-splithead-8dev")
    assert (r.dtype, r.mode, r.split_head_dim, r.devices) == ("bf16", "aot", True, 8)
    assert FlaxRecipe.from_tag("fp32-jit-alldev").devices == 0
    assert FlaxRecipe.from_tag("fp32-jit").devices == 1


@pytest.mark.parametrize(
    "tag, match",
    [
        ("fp16-jit", "parameter dtype"),
        ("bf16", "execution mode"),
        ("bf16-eager", "execution mode"),
        ("bf16-aot-8dev-splithead", "out of order"),
        ("bf16-aot-1dev", "canonical"),
        ("bf16-jit-0dev", "alldev"),
        ("bf16-jit-2dev-4dev", "two device counts"),
        ("bf16-jit-fast", "unknown token"),
    ],
)
def test_bad_recipe_tags(tag, match):
    with pytest.raises(RecipeError, match=match):
        FlaxRecipe.from_tag(tag)


def test_bad_recipe_fields():
    with pytest.raises(RecipeError):
        FlaxRecipe(devices=-1)
    with pytest.raises(RecipeError):
        FlaxRecipe(mode="pmap")


def test_spec_reference_and_thresholds():
    spec = framework_spec("jax")
    assert spec.module == "pipelines.flax_sd" and all(name in spec.named for name in spec.default.values())
    ladder = resolve_recipes("jax", ["ladder"])
    assert ladder[0] == FlaxRecipe() and ladder[0].is_reference
    assert FlaxRecipe.from_tag("bf16-aot-splithead-alldev").reference() == FlaxRecipe()
    assert FlaxRecipe(dtype="bf16").fidelity_thresholds() < FlaxRecipe().fidelity_thresholds()
    case = Case("jax", FlaxRecipe.from_tag("bf16-aot-splithead-4dev"), "tiny", steps=STEPS)
    assert case.id == "tiny-bf16-aot-splithead-4dev-bs1-2steps"
    assert case.reference.recipe == FlaxRecipe()


def test_recipe_module_imports_no_framework():
    code = "import sys, pipelines.jax_recipes; bad = [m for m in ('jax', 'flax', 'diffusers', 'torch') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], env=_env(), cwd=REPO, check=True, timeout=120)


# -- the tiny pipeline -------------------------------------------------------------------------------


def _case(tag: str, device: str = "cpu") -> Case:
    return Case("jax", FlaxRecipe.from_tag(tag), "tiny", device=device, steps=STEPS)


@pytest.fixture(scope="module")
def flax_sd():
    _needs_stack()
    from pipelines import flax_sd

    return flax_sd


@pytest.fixture(scope="module")
def jit_runner(flax_sd):
    runner = flax_sd.build(_case("fp32-jit"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def aot_runner(flax_sd):
    runner = flax_sd.build(_case("fp32-aot"))
    yield runner
    runner.close()


def test_generate_shapes_dtypes_determinism(jit_runner):
    first = jit_runner.generate()
    second = jit_runner.generate()
    assert first.images.shape == (1, 64, 64, 3) and first.images.dtype == np.uint8
    np.testing.assert_array_equal(first.images, second.images)
    assert 0 < first.images.std()
    info = jit_runner.compile_info()
    assert info["devices"] == 1 and info["images_per_call"] == 1 and info["mode"] == "jit"
    assert info["compile_s"] >= 0 and info["images_per_s"] > 0
    assert info["param_counts"]["unet"] > 0
    json.dumps(info)  # the harness stores it


def test_instrumented_breakdown_matches_generate(jit_runner):
    images = jit_runner.generate().images
    gen, breakdown = jit_runner.generate_instrumented()
    assert gen.latents.shape == (1, 4, 16, 16) and gen.latents.dtype == np.float32
    assert np.isfinite(gen.latents).all()
    assert _psnr(gen.images, images) >= 40.0
    b = breakdown.as_dict()
    assert len(breakdown.step_s) == STEPS
    assert b["text_encode_s"] > 0 and b["decode_s"] > 0 and b["denoise_s"] > 0
    assert b["total_s"] >= b["text_encode_s"] + b["denoise_s"] + b["decode_s"] - 1e-6
    assert "instrumented_compile_s" in jit_runner.compile_info()


def test_jit_and_aot_agree(jit_runner, aot_runner):
    info = aot_runner.compile_info()
    assert info["aot_compile_s"] > 0 and info["aot_lower_s"] > 0
    a = aot_runner.generate()
    assert aot_runner.compile_info()["first_call_compile_s"] < info["compile_s"] + 1e-9
    assert _psnr(a.images, jit_runner.generate().images) >= 40.0


def test_bf16_params_keep_fp32_scheduler_state(flax_sd):
    import jax
    import jax.numpy as jnp

    runner = flax_sd.build(_case("bf16-jit"))  # no generate(): building compiles nothing
    try:
        model_dtypes = {leaf.dtype for k, v in runner.p_params.items() if k != "scheduler"
                        for leaf in jax.tree_util.tree_leaves(v)}
        assert model_dtypes == {jnp.dtype(jnp.bfloat16)}
        sched = [leaf for leaf in jax.tree_util.tree_leaves(runner.p_params["scheduler"])
                 if jnp.issubdtype(leaf.dtype, jnp.floating)]
        assert sched and all(leaf.dtype == jnp.float32 for leaf in sched)
        assert runner.compile_info()["param_dtype"] == "bf16"
    finally:
        runner.close()


def test_missing_backend_and_devices_skip(flax_sd):
    with pytest.raises(pytest.skip.Exception, match="tpu"):
        flax_sd.build(_case("fp32-jit", device="tpu"))
    with pytest.raises(pytest.skip.Exception, match="xla_force_host_platform_device_count"):
        flax_sd.build(_case("fp32-aot-64dev"))


MULTI_DEVICE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax
    from diffperf.cases import Case
    from pipelines import flax_sd
    from pipelines.jax_recipes import FlaxRecipe

    assert jax.local_device_count() == 4, jax.devices()
    runner = flax_sd.build(Case("jax", FlaxRecipe.from_tag("fp32-aot-alldev"), "tiny", steps=%d))
    images = [runner.generate().images for _ in range(2)][-1]
    np.save(sys.argv[1], images)
    print("RESULT " + json.dumps({"info": runner.compile_info()}, default=str))
    """
    % STEPS
)


def test_multi_device_seeds_and_throughput(flax_sd, jit_runner, tmp_path):
    out = tmp_path / "images.npy"
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE, str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    info = result["info"]
    assert info["devices"] == 4 and info["images_per_call"] == 4 and info["images_per_s"] > 0
    assert info["images_per_s_per_device"] == pytest.approx(info["images_per_s"] / 4)
    images = np.load(out)
    assert images.shape == (4, 64, 64, 3)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(images[i], images[j]), f"devices {i} and {j} drew the same noise"
    # Device 0 draws from the one-device reference's key (the fidelity output is device 0's share).
    assert _psnr(images[0], jit_runner.generate().images[0]) >= 40.0


def test_flax_usable_after_diffusers_imported_with_flax_off():
    _needs_stack()
    code = textwrap.dedent(
        """
        import os
        os.environ["USE_FLAX"] = "0"
        import diffusers, transformers
        assert not diffusers.utils.is_flax_available()
        from pipelines import flax_sd
        api = flax_sd.flax_api()
        assert api.patched_after_import
        assert api.FlaxStableDiffusionPipeline.__module__.endswith("pipeline_flax_stable_diffusion")
        assert api.FlaxStableDiffusionXLPipeline.__module__.endswith("pipeline_flax_stable_diffusion_xl")
        from transformers import FlaxCLIPTextModel
        assert FlaxCLIPTextModel is api.FlaxCLIPTextModel
        from diffperf.presets import get_preset
        assert flax_sd.parameter_counts(get_preset("tiny"))["unet"] > 0
        """
    )
    subprocess.run([sys.executable, "-c", code], env=_env(), cwd=REPO, check=True, timeout=600)


# -- accelerator paths with fakes (issue 14: items 4, 5, 9, 10, 11, 12) --------------------------------


def test_tpu_fidelity_reference_fits_the_chip():
    """An fp32 SDXL does not fit a 16 GiB v5e chip and the seed never runs fp32: the TPU reference is bf16."""
    case = Case("jax", FlaxRecipe.from_tag("bf16-aot-splithead-alldev"), "sdxl", device="tpu", steps=25)
    assert case.reference.recipe == FlaxRecipe(dtype="bf16")
    assert case.reference.device == "tpu" and case.reference.steps == 25
    assert Case("jax", FlaxRecipe(dtype="bf16"), "sdxl", device="tpu").is_reference
    # Elsewhere the reference stays fp32.
    assert Case("jax", FlaxRecipe.from_tag("bf16-aot"), "tiny", device="cpu").reference.recipe == FlaxRecipe()
    assert Case("jax", FlaxRecipe.from_tag("bf16-aot"), "sdxl", device="cuda").reference.recipe == FlaxRecipe()


class _FakeTpu:
    platform = "tpu"
    device_kind = "TPU v5 lite"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_jax_memory_says_which_figure_it_is(flax_sd):
    """The peak cannot be reset: a phase below an earlier peak reports bytes in use, labelled a lower bound."""
    stats = {"peak_bytes_in_use": 10_000, "bytes_in_use": 2_000}
    probe = flax_sd.JaxDeviceMemory([_FakeTpu(stats)])
    probe.reset()
    stats.update(peak_bytes_in_use=12_000, bytes_in_use=3_000)  # this phase set a new peak: its own
    assert probe.peak_bytes() == 12_000 and probe.kind == "jax-peak"
    probe.reset()
    stats.update(bytes_in_use=2_500)  # peak unchanged: this phase's own peak is unknown
    assert probe.peak_bytes() == 2_500 and probe.kind == "jax-in-use-lower-bound"
    probe = flax_sd.JaxDeviceMemory([_FakeTpu(None)])  # a backend without allocator statistics
    probe.reset()
    assert probe.peak_bytes() is None and probe.kind == "unavailable"


def test_record_carries_each_phase_memory_kind_and_the_aot_compile_figure():
    from diffperf import harness
    from pipelines.base import Generation

    class Memory:
        kind = "jax-in-use-lower-bound"

    class FakeRunner:
        memory = Memory()

        def compile_info(self):  # what FlaxRunner reports in aot mode
            return {"aot_lower_s": 4.0, "aot_compile_s": 8.0, "compile_s": 12.0, "ahead_of_time_compile_s": 12.0,
                    "devices": 4, "mode": "aot"}

    case = Case("jax", FlaxRecipe.from_tag("bf16-aot-splithead-alldev"), "tiny", device="tpu", steps=STEPS)
    prepared = harness.Prepared(case, FakeRunner(), build_s=15.0, cold_start_s=3.0, cold_peak_bytes=9,
                                generation=Generation(np.zeros((1, 8, 8, 3), np.uint8)), first_breakdown=None,
                                cold_memory_kind="jax-peak")
    rec = harness.record(prepared, [1.0, 1.0, 1.0], 5, [], steady_memory_kind="jax-in-use-lower-bound")
    # The seed's three figures: compiled in 12 s (at build), first inference 3 s, inference 1 s.
    assert rec["compile_s"] == 12.0 and rec["compile_kind"] == "ahead-of-time"
    assert rec["cold_start_s"] == 3.0 and rec["median_s"] == 1.0
    assert rec["memory_kinds"] == {"cold": "jax-peak", "steady": "jax-in-use-lower-bound"}
    assert rec["memory_kind"] == "jax-in-use-lower-bound"
    assert rec["images_per_s"] == pytest.approx(4.0)


def test_hardware_id_names_tpu_chip_kind_and_count(monkeypatch):
    _needs_stack()
    import jax

    from diffperf import hardware

    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    hardware.tpu_type.cache_clear()
    monkeypatch.setattr(jax, "devices", lambda backend=None: [_FakeTpu({})] * 8)
    try:
        v5e = hardware.hardware_id("tpu")
        monkeypatch.setattr(jax, "devices", lambda backend=None: [_FakeTpu({})] * 4)
        fewer = hardware.hardware_id("tpu")
        _FakeTpu.device_kind = "TPU v4"
        v4 = hardware.hardware_id("tpu")
    finally:
        _FakeTpu.device_kind = "TPU v5 lite"
        hardware.tpu_type.cache_clear()
    assert v5e == "tpu-8x-tpu-v5-lite"
    assert len({v5e, fewer, v4}) == 3, (v5e, fewer, v4)


def test_jax_cache_benchmark_builds_its_case_for_the_default_backend(flax_sd, monkeypatch):
    """On a TPU VM the cache benchmark must build TPU cases (not host-CPU ones, nor pytest's Skipped)."""
    import argparse
    import importlib.util

    import jax

    spec = importlib.util.spec_from_file_location("jax_cache", REPO / "benchmarks" / "jax_cache.py")
    jax_cache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jax_cache)
    seen = []

    class Stop(Exception):
        pass

    def fake_build(case):
        seen.append(case)
        raise Stop

    monkeypatch.setattr(flax_sd, "build", fake_build)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    args = argparse.Namespace(recipe="bf16-aot-splithead-alldev", preset="tiny", steps=STEPS, batch_size=1, calls=1,
                              device=None)
    with pytest.raises(Stop):
        jax_cache.child(args)
    assert seen[-1].device == "tpu"


def test_aot_record_reports_the_real_compile_and_the_seed_negative_prompt(flax_sd, aot_runner):
    """AOT: the reported compile figure is lower+compile at build; guidance 5 and a negative prompt reach both the
    headline program and the instrumented pieces (the fidelity output)."""
    import dataclasses

    from diffperf import harness

    case = dataclasses.replace(_case("fp32-aot"), guidance_scale=5.0, negative_prompt="cartoon, illustration")
    assert case.id.endswith("-cfg5-neg")
    prepared = harness.prepare(case)
    try:
        rec = harness.measure(prepared, rounds=2, warmup_rounds=0, breakdown_rounds=1, machine_reference=False)
        info = rec["compile_info"]
        assert rec["compile_kind"] == "ahead-of-time"
        assert rec["compile_s"] == pytest.approx(info["aot_lower_s"] + info["aot_compile_s"])
        images = prepared.runner.generate().images
        assert _psnr(prepared.generation.images, images) >= 40.0  # instrumented == headline, negative prompt included
        plain = aot_runner.generate().images
        assert not np.array_equal(images, plain), "guidance/negative prompt did not change the output"
    finally:
        prepared.close()


SEED_CONFIG = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax
    from diffperf.cases import Case, framework_spec, resolve_recipes
    from pipelines import flax_sd

    cond = framework_spec("jax").defaults["tpu"]
    out = {}
    for recipe in resolve_recipes("jax", [cond.recipes]):
        case = Case("jax", recipe, "tiny", device="cpu", steps=%d, batch_size=cond.batch_size,
                    guidance_scale=cond.guidance_scale, negative_prompt=cond.negative_prompt)
        runner = flax_sd.build(case)
        images = [runner.generate().images for _ in range(2)][-1]
        gen, _ = runner.generate_instrumented()
        out[recipe.tag()] = {"info": runner.compile_info(), "images": images.tolist(), "instrumented": gen.images.tolist()}
        runner.close()
    print("RESULT " + json.dumps(out, default=str))
    """
    % STEPS
)


def test_the_tpu_default_recipes_run_on_forced_host_devices(flax_sd):
    """The TPU default (the seed's jit and AOT programs: bf16, split heads, every device, guidance 5 and a negative
    prompt) on 2 forced host devices: every device renders, jit and AOT agree, the instrumented pieces match."""
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SEED_CONFIG], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert sorted(out) == ["bf16-aot-splithead-alldev", "bf16-jit-splithead-alldev"]
    jit, aot = (np.array(out[k]["images"], np.uint8) for k in sorted(out, reverse=True))
    for tag, r in out.items():
        info = r["info"]
        assert info["devices"] == 2 and info["split_head_dim"] and info["param_dtype"] == "bf16", tag
        images = np.array(r["images"], np.uint8)
        assert images.shape == (2, 64, 64, 3) and not np.array_equal(images[0], images[1])
        assert _psnr(np.array(r["instrumented"], np.uint8)[0], images[0]) >= 30.0, tag
    assert _psnr(jit, aot) >= 30.0
    assert out["bf16-aot-splithead-alldev"]["info"]["ahead_of_time_compile_s"] > 0
