"""Presets, the offline tokenizer and the recipe tags."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffperf.cases import Case, RecipeError, resolve_recipes
from diffperf.presets import CLIP_VOCAB_SIZE, PRESETS, get_preset, parameter_counts
from diffperf.tokenizer import clip_tokenizer, tokenize
from pipelines.torch_recipes import GUIDE_LADDER, TorchRecipe
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_real_architectures_have_the_published_parameter_counts(name):
    preset = get_preset(name)
    counts = parameter_counts(preset)
    assert counts == dict(preset.expected_params)


def test_published_counts_are_the_issue_numbers():
    assert dict(PRESETS["sd15"].expected_params) == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    assert PRESETS["sdxl"].expected_params["unet"] == 2_567_463_684
    assert PRESETS["sdxl"].expected_params["text_encoder_2"] == 694_659_840


def test_presets_command_lists_counts(capsys):
    from diffperf.__main__ import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "859,520,964" in out and "2,567,463,684" in out and "694,659,840" in out and "tiny" in out
    assert "meta device" in out


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown preset 'sd3'; known presets: tiny, sd15, sdxl"):
        get_preset("sd3")


def test_tokenizer_is_offline_clip_compatible():
    ids = tokenize(["Astronaut in a jungle, cold color palette, muted colors, detailed, 8k", ""])
    assert all(len(x) == 77 for x in ids)
    assert ids[0][0] == 49406 and 49407 in ids[0]
    assert max(max(x) for x in ids) < CLIP_VOCAB_SIZE
    assert ids[0] != ids[1]
    assert clip_tokenizer(pad_token="!")("a", padding="max_length", max_length=5).input_ids[-1] == 0


def test_tokenize_builds_its_tokenizer_once(monkeypatch):
    import diffperf.tokenizer as tokenizer

    built = []
    monkeypatch.setattr(tokenizer, "clip_tokenizer", lambda *a, **k: built.append(1) or clip_tokenizer(*a, **k))
    tokenizer._shared_tokenizer.cache_clear()
    try:
        first = tokenize(["a photo"])
        assert tokenize(["a photo"]) == first and tokenize(["another photo"]) != first
        assert len(built) == 1  # a TF round tokenizes its prompt; it must not rebuild the tokenizer
    finally:
        tokenizer._shared_tokenizer.cache_clear()


def test_tokenizer_leaves_no_folder_behind(tmp_path):
    code = "from diffperf.tokenizer import clip_tokenizer; assert clip_tokenizer()('a photo').input_ids[0] == 49406"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # a fresh process: nothing cached from earlier tests
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe", GUIDE_LADDER, ids=lambda r: r.tag())
def test_torch_tags_round_trip(recipe):
    assert TorchRecipe.from_tag(recipe.tag()) == recipe


def test_ladder_is_the_guides_sequence():
    assert [r.tag() for r in resolve_recipes("torch", ["ladder"])] == [
        "fp32-classic", "bf16-classic", "bf16-sdpa", "bf16-sdpa-cl-compile", "bf16-sdpa-cl-fuseqkv-compile",
        "bf16-sdpa-cl-fuseqkv-compile-int8dq",
    ]


@pytest.mark.parametrize("tag, message", [
    ("bf16", "the second token must be the attention"),
    ("bf16-sdpa-int8dq-int8wo", "names two quantizations"),
    ("bf16-sdpa-compile-cl", "out of order or not canonical; write it as 'bf16-sdpa-cl-compile'"),
    ("fp32-classic-fuseqkv", "it needs 'sdpa' attention"),
])
def test_bad_torch_tags(tag, message):
    with pytest.raises(RecipeError, match=message):
        TorchRecipe.from_tag(tag)


def test_case_ids_and_validation():
    case = Case("torch", TorchRecipe.from_tag("bf16-sdpa-cl-compile"), "sdxl", device="cuda", steps=30)
    assert case.id == "sdxl-bf16-sdpa-cl-compile-bs1-30steps"
    assert Case("torch", TorchRecipe(), "sd15", height=768, width=512, steps=30).id == "sd15-fp32-classic-768x512-bs1-30steps"
    with pytest.raises(RecipeError, match="not a multiple of 64"):
        Case("torch", TorchRecipe(), "sd15", height=500, width=512)
    with pytest.raises(RecipeError, match="batch size must be >= 1"):
        Case("torch", TorchRecipe(), "tiny", batch_size=0)


def test_unsupported_cases_have_reasons():
    assert "CUDA" in TorchRecipe.from_tag("bf16-sdpa-cl-compile-fp8dq").unsupported("cpu")
    assert TorchRecipe.from_tag("bf16-sdpa").unsupported("cuda") is None


# --------------------------------------------------------------------------------------------------
# Issue 14: fp8 capability gate, fp8 precision, fp16 + quantization on a force_upcast VAE, int8wo
# --------------------------------------------------------------------------------------------------

FP8 = "bf16-sdpa-cl-compile-fp8dq"


@pytest.mark.parametrize("capability, skipped", [("8.0", True), ("8.6", True), ("8.9", False), ("9.0", False)])
def test_fp8_is_gated_on_compute_capability(monkeypatch, capability, skipped):
    from diffperf import hardware

    monkeypatch.setenv("DIFFPERF_FAKE_CUDA_CAPABILITY", capability)
    assert hardware.cuda_compute_capability() == tuple(int(x) for x in capability.split("."))
    reason = TorchRecipe.from_tag(FP8).unsupported("cuda")
    if skipped:
        assert reason and ">= 8.9" in reason and f"this one is {capability}" in reason
    else:
        assert reason is None
    assert TorchRecipe.from_tag("bf16-sdpa-cl-compile-int8dq").unsupported("cuda") is None  # fp8 only


def test_fp8_capability_read_from_nvidia_smi(monkeypatch, tmp_path):
    from diffperf import hardware

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 9.0\necho 8.0\n")  # two GPUs: the lowest decides
    smi.chmod(0o755)
    monkeypatch.delenv("DIFFPERF_FAKE_CUDA_CAPABILITY", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}")
    hardware._nvidia_smi_capabilities.cache_clear()
    try:
        assert hardware.cuda_compute_capability() == (8, 0)
        assert "this one is 8.0" in TorchRecipe.from_tag(FP8).unsupported("cuda")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        hardware._nvidia_smi_capabilities.cache_clear()
        assert hardware.cuda_compute_capability() == (9, 0)
    finally:
        hardware._nvidia_smi_capabilities.cache_clear()
    monkeypatch.setenv("DIFFPERF_FAKE_CUDA_CAPABILITY", "eight")
    with pytest.raises(ValueError, match="DIFFPERF_FAKE_CUDA_CAPABILITY='eight'"):
        hardware.cuda_compute_capability()


@pytest.mark.parametrize("tag", ["fp16-sdpa-cl-compile-fp8dq", "fp32-sdpa-fp8dq"])
def test_fp8_needs_bf16(tag):
    with pytest.raises(RecipeError, match=rf"recipe '{tag}': 'fp8dq' needs bf16"):
        TorchRecipe.from_tag(tag)


@pytest.mark.parametrize("quant", ["int8dq", "int8wo", "fp8dq"])
def test_fp16_quantization_on_a_force_upcast_vae_is_rejected(quant):
    assert get_preset("sdxl").vae["force_upcast"]
    precision = "bf16" if quant == "fp8dq" else "fp16"
    if quant != "fp8dq":
        recipe = TorchRecipe.from_tag(f"{precision}-sdpa-{quant}")
        with pytest.raises(RecipeError, match=rf"recipe 'fp16-sdpa-{quant}' on preset 'sdxl': fp16 with {quant}"):
            Case("torch", recipe, "sdxl", device="cuda", steps=2)
        assert Case("torch", recipe, "sd15", device="cuda", steps=2)  # no force_upcast there
    ok = TorchRecipe.from_tag(f"bf16-sdpa-{quant}")
    assert Case("torch", ok, "sdxl", device="cuda", steps=2).recipe == ok
    assert Case("torch", TorchRecipe.from_tag("fp16-sdpa"), "sdxl", device="cuda", steps=2)


def test_int8wo_named_recipe_is_compiled_and_not_the_guides():
    (recipe,) = resolve_recipes("torch", ["int8wo"])
    assert recipe.tag() == "bf16-sdpa-cl-fuseqkv-compile-int8wo"
    assert recipe.compile_mode == "max-autotune" and recipe.fullgraph
    assert all(r.quant != "int8wo" for r in GUIDE_LADDER)
