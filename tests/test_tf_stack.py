"""CPU tests of the TensorFlow/KerasCV stack: recipes, the tiny builder, the SavedModel round trip, and the
strict xfail of the SavedModel text encoder under XLA (tensorflow/tensorflow#59818).

The builder tests share one tiny in-memory build and one SavedModel export (2 steps, 64x64) to stay within
about two minutes on two CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from diffperf.cases import Case, RecipeError, framework_spec, resolve_recipes
from pipelines.tf_recipes import GUIDE_LADDER, SAVEDMODEL, TF_ISSUE_59818, TF_ISSUE_59818_RAISES, KerasRecipe
from tests.numerics import assert_close_to_scale

STEPS = 2

# --------------------------------------------------------------------------------------------------
# Recipes (no framework needed)
# --------------------------------------------------------------------------------------------------


def _all_named() -> list[KerasRecipe]:
    spec = framework_spec("tf")
    return [r for recipes in spec.named.values() for r in recipes]


@pytest.mark.parametrize("recipe", sorted(set(_all_named()), key=lambda r: r.tag()), ids=lambda r: r.tag())
def test_tag_round_trip(recipe):
    assert KerasRecipe.from_tag(recipe.tag()) == recipe


def test_ladder_tags_are_readable():
    assert [r.tag() for r in GUIDE_LADDER] == ["fp32", "mp16", "fp32-xla", "mp16-xla"]
    assert [r.tag() for r in SAVEDMODEL] == ["fp32-savedmodel", "fp32-savedmodel-xla"]
    assert KerasRecipe(precision="mixed_bfloat16", jit_compile=True).tag() == "mpbf16-xla"
    assert KerasRecipe(precision="float32") == KerasRecipe()


@pytest.mark.parametrize(
    "tag, needle",
    [
        ("", "precision"),
        ("fp16", "precision"),
        ("xla", "precision"),
        ("fp32-turbo", "'turbo'"),
        ("mp16-xla-xla", "'xla'"),
        ("fp32-xla-savedmodel", "out of order"),
        ("fp32-xlatext", "xlatext"),
        ("fp32-savedmodel-xlatext", "xlatext"),
    ],
)
def test_bad_tags(tag, needle):
    with pytest.raises(RecipeError) as info:
        KerasRecipe.from_tag(tag)
    assert needle in str(info.value)


def test_bad_fields():
    with pytest.raises(RecipeError, match="precision"):
        KerasRecipe(precision="float16")
    with pytest.raises(RecipeError, match="xlatext"):
        KerasRecipe(jit_compile=True, xla_text_encoder=True)


def test_spec_and_gating():
    spec = framework_spec("tf")
    assert spec.module == "pipelines.kerascv_sd" and all(name in spec.named for name in spec.default.values())
    assert tuple(spec.named["ladder"]) == GUIDE_LADDER
    assert resolve_recipes("tf", ["ladder", "savedmodel", "fp32"]) == list(GUIDE_LADDER + SAVEDMODEL)
    for recipe in _all_named():
        assert recipe.reference() == KerasRecipe()
        assert recipe.unsupported("tpu")
        assert recipe.unsupported("cpu") is None and recipe.unsupported("cuda") is None
        min_psnr, min_cos = recipe.fidelity_thresholds()
        assert 0 < min_psnr and 0 < min_cos <= 1
    xlatext = KerasRecipe.from_tag("fp32-savedmodel-xla-xlatext")
    assert "59818" in xlatext.known_failure("cpu") and "59818" in xlatext.known_failure("cuda")
    assert all(r.known_failure("cpu") is None for r in GUIDE_LADDER + SAVEDMODEL)
    case = Case("tf", KerasRecipe.from_tag("mp16-xla"), "tiny", steps=STEPS, batch_size=3)
    assert case.id == "tiny-mp16-xla-bs3-2steps"


def test_recipe_module_imports_no_framework():
    code = (
        "import sys, pipelines.tf_recipes; "
        "bad = [m for m in ('tensorflow', 'keras', 'keras_cv', 'torch', 'jax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# Builder (tiny preset, CPU)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kcv(tmp_path_factory):
    pytest.importorskip("tensorflow", reason="the TF stack needs tensorflow")
    pytest.importorskip("keras_cv", reason="the TF stack needs keras-cv")
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFPERF_CACHE_DIR", str(tmp_path_factory.mktemp("diffperf-cache")))
    from pipelines import kerascv_sd

    yield kerascv_sd
    mp.undo()


def _case(tag: str = "fp32") -> Case:
    return Case("tf", KerasRecipe.from_tag(tag), "tiny", device="cpu", steps=STEPS, height=64, width=64)


@pytest.fixture(scope="module")
def runner(kcv):
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # a non-default policy close() must restore
    try:
        r = kcv.build(_case())
    except BaseException:
        keras.mixed_precision.set_global_policy("float32")
        raise
    first = r.generate()  # the cold call
    yield r, first
    r.close()
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def saved(kcv, runner):
    """Export the in-memory runner's own models where ``build`` looks for them, so it loads, not rebuilds."""
    r, _ = runner
    case = _case("fp32-savedmodel")
    folder = kcv.cache_root() / kcv.savedmodel_key(case)
    kcv.export_savedmodels(case, (r.text_encoder, r.diffusion_model, r.decoder), folder)
    return case, folder


def test_builder_generates_uint8_images(runner):
    r, first = runner
    import keras

    assert keras.mixed_precision.global_policy().name == "float32"  # the recipe's policy while built
    assert first.images.shape == (1, 64, 64, 3) and first.images.dtype == np.uint8
    assert first.images.std() > 0
    params = r.compile_info()["parameters"]
    assert set(params) == {"text_encoder", "diffusion_model", "decoder"} and all(params.values())


def test_builder_is_deterministic(runner):
    r, first = runner
    again = r.generate()
    np.testing.assert_array_equal(again.images, first.images)


def test_instrumented_breakdown(runner):
    r, first = runner
    gen, breakdown = r.generate_instrumented()
    np.testing.assert_array_equal(gen.images, first.images)
    assert gen.latents is not None and gen.latents.shape == (1, 16, 16, 4) and np.isfinite(gen.latents).all()
    assert len(breakdown.step_s) == STEPS and all(s > 0 for s in breakdown.step_s)
    d = breakdown.as_dict()
    assert d["text_encode_s"] > 0 and d["decode_s"] > 0
    assert d["text_encode_s"] + d["denoise_s"] + d["decode_s"] <= d["total_s"] + 1e-6
    r.memory.reset()
    r.generate()
    assert r.memory.peak_bytes() > 0


def test_timestep_schedule_matches_kerascv(kcv):
    np.testing.assert_array_equal(kcv.kerascv_timesteps(5), [0, 250, 500, 749, 999])
    assert list(kcv.kerascv_timesteps(1)) == [0]


def test_savedmodel_round_trip(kcv, runner, saved):
    import keras

    r, first = runner
    case, folder = saved
    ref, _ = r.generate_instrumented()
    sm = kcv.build(case)
    try:
        info = sm.compile_info()
        assert info["savedmodel_cache_hit"] is True and info["load_s"] > 0
        assert info["savedmodel_dir"] == str(folder)
        gen, breakdown = sm.generate_instrumented()
        assert gen.images.shape == first.images.shape and gen.images.dtype == np.uint8
        # float32 reordering between the Keras graph and the loaded concrete functions: ~1e-5 of the scale
        assert_close_to_scale(gen.latents, ref.latents, rel=1e-4, what="latents after the SavedModel round trip")
        assert np.abs(gen.images.astype(int) - first.images.astype(int)).max() <= 1
        assert breakdown.step_s == [] and breakdown.denoise_s > 0  # the loop is one graph
        np.testing.assert_array_equal(sm.generate().images, gen.images)
    finally:
        sm.close()
    assert keras.mixed_precision.global_policy().name == "float32"


_XLATEXT = KerasRecipe.from_tag("fp32-savedmodel-xla-xlatext")


@pytest.mark.xfail(strict=True, raises=pytest.RaisesExc(check=_XLATEXT.known_failure_raises("cpu").matches),
                   reason=_XLATEXT.known_failure("cpu"))
def test_savedmodel_text_encoder_under_xla(kcv, saved):
    """Strict xfail with the recipe's own ``raises=``: only the tensorflow#59818 error xfails; when the text
    encoder starts to XLA-compile this XPASSes, and any other error fails."""
    case, _ = saved
    assert _XLATEXT.known_failure("cpu") == TF_ISSUE_59818
    sm = kcv.build(Case("tf", _XLATEXT, case.preset, device="cpu", steps=STEPS, height=64, width=64))
    try:
        sm.generate()
    finally:
        sm.close()


def test_known_failure_raises_matches_only_the_upstream_error(kcv):
    import tensorflow as tf

    expected = _XLATEXT.known_failure_raises("cuda")
    assert expected == TF_ISSUE_59818_RAISES and _XLATEXT.known_failure_raises("cpu") == expected
    assert all(r.known_failure_raises("cpu") is None for r in GUIDE_LADDER + SAVEDMODEL)
    branch = "left_branch_shape.dimensions_size() != right_branch_shape.dimensions_size() (3 vs 2)"
    assert expected.matches(tf.errors.InvalidArgumentError(None, None, branch))
    assert not expected.matches(tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [1,2] vs. [3]"))
    assert not expected.matches(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating " + branch))
    assert not expected.matches(RuntimeError(branch))


def test_close_restores_policy(runner):
    """Last on purpose: closes the shared runner."""
    import keras

    r, _ = runner
    assert keras.mixed_precision.global_policy().name == "float32"
    r.close()
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert r.text_encoder is None and r.diffusion_model is None
    r.close()  # idempotent


def test_models_are_shared_between_recipes_that_only_compile_differently(kcv, runner):
    """After test_close_restores_policy: the closed runner's models serve fp32-xla; an open runner's never do."""
    from diffperf.harness import release_shared

    r, first = runner
    assert r.text_encoder is None  # closed by the test before
    xla = kcv.build(_case("fp32-xla"))
    try:
        assert xla.compile_info()["models_reused"] and xla.compile_info()["jit_compile"]
        other = kcv.build(_case("fp32"))  # xla holds the kept models: this one builds its own
        try:
            assert not other.compile_info()["models_reused"]
            assert other.diffusion_model is not xla.diffusion_model
            np.testing.assert_array_equal(other.generate().images, first.images)  # same seeded weights
        finally:
            other.close()
        out = xla.generate().images
        assert np.abs(out.astype(int) - first.images.astype(int)).max() <= 8  # XLA: same models, same image
    finally:
        xla.close()
    release_shared(keep="tf")
    assert kcv._SHARED  # kept for the next TF case
    release_shared(keep="torch")
    assert not kcv._SHARED  # another framework's case: dropped


_XLA_CACHE_SCRIPT = """
import sys
import numpy as np, keras
from pipelines.kerascv_sd import align_function_uids
extra, align = int(sys.argv[1]), sys.argv[2] == "align"
x = np.ones((1, 4), np.float32)
eager = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
for _ in range(extra):  # a noisy earlier case: its round count varies from run to run
    eager.predict_on_batch(x)
if align:
    align_function_uids()
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
model.compile(jit_compile=True)
model.predict_on_batch(x)
"""


def _xla_cache_files(tmp_path, runs: list[tuple[int, str]]) -> list[str]:
    cache = tmp_path / "tf-xla"
    env = {"TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={cache}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    for extra, align in runs:
        proc = subprocess.run([sys.executable, "-c", _XLA_CACHE_SCRIPT, str(extra), align], capture_output=True,
                              text=True, env={**os.environ, **env}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(p.name for p in cache.iterdir())


def test_xla_persistent_cache_hits_after_a_different_number_of_earlier_calls(kcv, tmp_path):
    """Aligned uids: the second process finds the first one's XLA executable although it made 5 more calls.

    Without the alignment (the control), the same two processes write two cache entries.
    """
    assert len(_xla_cache_files(tmp_path / "aligned", [(0, "align"), (5, "align")])) == 1
    assert len(_xla_cache_files(tmp_path / "control", [(0, "plain"), (5, "plain")])) == 2


def test_align_function_uids_lands_on_the_block_boundary(kcv):
    from tensorflow.python import pywrap_tfe

    first = kcv.align_function_uids(block=1000)
    assert first % 1000 == 0
    for _ in range(7):
        pywrap_tfe.TFE_Py_UID()
    assert kcv.align_function_uids(block=1000) == first + 1000
    assert pywrap_tfe.TFE_Py_UID() == first + 1000  # the next function traced takes the boundary uid


# --------------------------------------------------------------------------------------------------
# Issue 14: the recipe's precision, read from the built layers
# --------------------------------------------------------------------------------------------------


def _layer_compute_dtypes(model) -> set[str]:
    import keras

    return {layer.compute_dtype for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))}


def test_mixed_precision_after_another_cases_models(kcv, monkeypatch):
    """fp32 then mp16 in one process (the ladder's order): the fp32 models kept for reuse are released by the
    mp16 build, and Keras 3's clear_session() resets the dtype policy with them; mp16 must still build in
    float16. Its record says so, read from the layers."""
    monkeypatch.setattr(kcv, "_SHARED", {})  # whatever the module's other tests keep, this one starts clean
    fp32 = kcv.build(_case("fp32"))
    try:
        assert _layer_compute_dtypes(fp32.diffusion_model) == {"float32"}
        fp32_info = fp32.compile_info()
    finally:
        fp32.close()
    assert kcv._SHARED and not kcv._SHARED["in_use"]  # kept under fp32's key: the mp16 build releases them
    mp16 = kcv.build(_case("mp16"))
    try:
        assert _layer_compute_dtypes(mp16.diffusion_model) == {"float16"}
        assert _layer_compute_dtypes(mp16.text_encoder) == {"float16"}
        info = mp16.compile_info()
        assert fp32_info["compute_dtype"] == "float32"
        assert info["compute_dtype"] == "float16" and info["keras_policy"] == "mixed_float16"
        assert info["compute_dtypes"] == dict.fromkeys(("text_encoder", "diffusion_model", "decoder"), "float16")
    finally:
        mp16.close()
        kcv.release_shared()


def test_a_build_in_the_wrong_precision_fails_the_case(kcv):
    info: dict = {}
    built = {"text_encoder": "float32", "diffusion_model": "float32", "decoder": "float32"}
    with pytest.raises(kcv.PrecisionError, match=r"tiny-mp16-bs1-2steps: recipe 'mp16' .*needs float16 compute.*"
                                                 r"diffusion_model=float32"):
        kcv.check_compute_dtypes(_case("mp16"), built, info)
    assert info["compute_dtype"] == "float32"  # recorded as built, not as asked
    with pytest.raises(kcv.PrecisionError, match="decoder=unknown"):
        kcv.check_compute_dtypes(_case("fp32"), {"text_encoder": "float32", "diffusion_model": "float32"}, {})
    kcv.check_compute_dtypes(_case("fp32"), built, info)
