"""The diffperf pytest plugin: ``--perf-*`` options, the case matrix, fixtures and reporting hooks.

Cases are generated in ``pytest_generate_tests`` for every test that asks for ``perf_case``: each
selected framework x device x recipe x batch size, marked with its hardware marker (``cpu``, ``cuda``,
``tpu``) and skipped with a stated reason when the hardware, the framework or the combination is missing.
The ``perf_case`` fixture builds one pipeline per parameter set, shared by the tests of that parameter
set and released (memory freed, compiler state reset) before the next one is built.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from diffperf import distributed, hardware, progress
from diffperf.baselines import DEFAULT_HISTORY, parse_history_length
from diffperf.cases import DEVICES, FRAMEWORKS, Case, RecipeError, framework_spec, matrix_skip_reason, resolve_recipes
from diffperf.distributed import GROUPS as DIST_GROUPS
from diffperf.malloc import MODES as MALLOC_MODES
from diffperf.presets import PRESETS, get_preset
from diffperf.reference import MODES as REFERENCE_MODES
from diffperf.session import PerfSession
from diffperf.stats import MIN_HISTORY
from diffperf.table import results_table

CONFIRM_MODES = ("ab", "off")  # --perf-confirm
AB_PROCESSES = 12  # --perf-ab-processes (diffperf.ab_replicate.DEFAULT_PROCESSES; not imported: scipy at startup)


# --------------------------------------------------------------------------------------------------
# Option types: each raises argparse.ArgumentTypeError naming the bad value.
# --------------------------------------------------------------------------------------------------


def parse_preset(value: str) -> str:
    if value == "auto" or value in PRESETS:
        return value
    raise argparse.ArgumentTypeError(f"unknown preset {value!r}; choose from auto, {', '.join(PRESETS)}")


def parse_frameworks(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in FRAMEWORKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown framework(s) {', '.join(bad) or value!r}; choose from {', '.join(FRAMEWORKS)}")
    return names


def parse_recipes(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("empty recipe list")
    for item in items:
        fw, sep, name = item.partition(":")
        if sep:
            if fw not in FRAMEWORKS:
                raise argparse.ArgumentTypeError(f"recipe {item!r}: unknown framework {fw!r}; choose from {', '.join(FRAMEWORKS)}")
            try:
                resolve_recipes(fw, [name])
            except (RecipeError, ImportError) as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
    return items


def _int_at_least(what: str, low: int):
    """A parser of integers ``>= low`` whose error names ``what``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {n}")
        return n

    parse.__name__ = what.replace(" ", "_")
    return parse


def _positive_int(what: str):
    return _int_at_least(what, 1)


def _non_negative_int(what: str):
    return _int_at_least(what, 0)


def parse_batch_sizes(value: str) -> tuple[int, ...]:
    parse = _positive_int("batch size")
    out = tuple(parse(v) for v in value.split(",") if v.strip())
    if not out:
        raise argparse.ArgumentTypeError("empty batch size list")
    return out


def parse_resolution(value: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", value.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"resolution must be HEIGHTxWIDTH or N, got {value!r}")
    h = int(m.group(1))
    w = int(m.group(2) or h)
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"resolution {h}x{w} is too small")
    return h, w


def parse_fraction(what: str, upper: float = 10.0):
    def parse(value: str) -> float:
        try:
            f = float(value.rstrip("%")) / (100.0 if value.endswith("%") else 1.0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number like 0.1 or 10%, got {value!r}") from None
        if not 0 <= f <= upper:
            raise argparse.ArgumentTypeError(f"{what} must be between 0 and {upper}, got {value!r}")
        return f

    return parse


def parse_seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number, got {value!r}") from None
    if s <= 0:
        raise argparse.ArgumentTypeError(f"seconds must be > 0, got {value!r}")
    return s


def _choice(what: str, choices: tuple[str, ...]):
    """A parser of one of ``choices`` whose error names ``what`` and lists them."""

    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


def parse_history(value: str) -> int:
    try:
        return parse_history_length(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--perf-baseline-history: {exc}") from None


def parse_weights_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"--perf-weights {value}: no such directory")
    if not (path / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"--perf-weights {value}: not a diffusers pipeline folder (no model_index.json)")
    return path.resolve()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("diffperf", "diffperf: diffusion inference benchmarks")
    add = group.addoption
    add("--perf-preset", type=parse_preset, default="auto", metavar="NAME",
        help="model preset: tiny, sd15, sdxl, or auto (each framework's default for the device: tiny on CPU; on "
             "CUDA sdxl for torch and jax, sd15 for tf; sdxl on TPU; see README). Default: auto.")
    add("--perf-frameworks", type=parse_frameworks, default=FRAMEWORKS, metavar="LIST",
        help="comma-separated stacks to run: torch, tf, jax. Default: torch,tf,jax.")
    add("--perf-recipes", type=parse_recipes, default=None, metavar="LIST",
        help="comma-separated recipes or ladder names, optionally framework-qualified (torch:ladder, "
             "torch:bf16-sdpa-compile, tf:ladder). A bare name applies to every framework that knows it. "
             "Default: each framework's default set for the device (see README).")
    add("--perf-steps", type=_positive_int("steps"), default=None, metavar="N",
        help="denoising steps. Default: the framework's default for the device (its seed's), else the preset's "
             "(tiny 4, sd15/sdxl 30).")
    add("--perf-resolution", type=parse_resolution, default=None, metavar="HxW",
        help="image resolution. Default: the framework's default for the device, else the preset's native one "
             "(tiny 64, sd15 512, sdxl 1024).")
    add("--perf-batch-size", type=parse_batch_sizes, default=None, metavar="LIST",
        help="comma-separated images per prompt. Default: the framework's default for the device (3 for tf on "
             "CUDA, as the KerasCV guide; else 1).")
    add("--perf-weights", type=parse_weights_dir, default=None, metavar="DIR",
        help="load a local diffusers pipeline folder (safetensors only) instead of random weights; the preset "
             "is read from its model_index.json. Default: seeded random weights.")
    add("--perf-seed", type=_non_negative_int("seed"), default=0, metavar="N", help="seed for weights and noise. Default: 0.")
    add("--perf-rounds", type=_positive_int("rounds"), default=10, metavar="N",
        help="minimum steady-state rounds per case (more when noisy, within --perf-max-time). Default: 10.")
    add("--perf-warmup-rounds", type=_non_negative_int("warmup rounds"), default=3, metavar="N",
        help="timed-then-discarded rounds after the cold call, also used to size the rounds. Default: 3.")
    add("--perf-max-time", type=parse_seconds, default=120.0, metavar="SECONDS",
        help="time budget for the steady-state rounds of one case when they grow for noise. Default: 120.")
    add("--perf-no-fidelity", action="store_true", default=False,
        help="skip the comparison with the fp32 reference output. Default: compare.")
    add("--perf-cache-dir", default=None, metavar="DIR",
        help="persistent compile caches (inductor, XLA, JAX) and SavedModels. Default: <rootdir>/.diffperf-cache.")
    add("--perf-baselines-dir", default=None, metavar="DIR", help="baseline files. Default: <rootdir>/baselines.")
    add("--perf-tolerance", type=parse_fraction("tolerance"), default=0.10, metavar="FRACTION",
        help="latency slowdown tolerated before the gate may fail a test (0.1 or 10%%). Default: 10%%.")
    add("--perf-memory-tolerance", type=parse_fraction("memory tolerance"), default=0.10, metavar="FRACTION",
        help="peak-memory growth tolerated. Default: 10%%.")
    add("--perf-compile-tolerance", type=parse_fraction("compile tolerance"), default=0.25, metavar="FRACTION",
        help="compile-time growth tolerated. Default: 25%%.")
    add("--perf-alpha", type=parse_fraction("alpha", upper=0.5), default=0.01, metavar="P",
        help="significance level of the regression test (one-sided Mann-Whitney U). Default: 0.01.")
    add("--perf-update-baselines", action="store_true", default=False,
        help="append this run's results to the history of its entries in baselines/<hardware-id>.json (atomically, "
             "keeping other entries). Default: off.")
    add("--perf-baseline-history", type=parse_history, default=DEFAULT_HISTORY, metavar="K",
        help="runs each baseline entry keeps in its history (--perf-update-baselines appends the run, the oldest "
             f"beyond K are dropped); the gate uses their spread from {MIN_HISTORY} runs on. Default: {DEFAULT_HISTORY}.")
    add("--perf-inject-slowdown", type=parse_fraction("injected slowdown"), default=0.0, metavar="FRACTION",
        help="make every timed call this much slower (calibrates the gate; never use for real runs). Default: 0.")
    add("--perf-reference", type=_choice("reference mode", REFERENCE_MODES), default="report", metavar="MODE",
        help="machine-speed reference workload timed around CPU cases (diffperf/reference.py): 'report' records "
             "it and notes a machine-speed change next to the gate's verdict, 'rescale' also rescales the rounds by "
             "it before the test, 'off' does not time it. Default: report.")
    add("--perf-malloc", type=_choice("malloc mode", MALLOC_MODES), default="steady", metavar="MODE",
        help="C allocator policy of the measuring process: 'steady' pins glibc's adaptive mmap/trim thresholds "
             "so a case's speed does not depend on what ran before it (see diffperf/malloc.py), 'system' "
             "leaves them alone. Default: steady.")
    add("--perf-journal", default=None, metavar="FILE",
        help="append one JSON line per finished test (fsync'ed at once: a crash loses nothing measured), or "
             "'none'. Default: <cache dir>/journal/<time>-<pid>.jsonl.")
    add("--perf-ab-base", default=None, metavar="REV",
        help="interleaved A/B: also run git revision REV (checked out in a temporary worktree, in a worker process) "
             "and judge each case on head/base round pairs in random order (diffperf/ab.py). Default: off.")
    add("--perf-ab-python", default=None, metavar="PYTHON",
        help="interleaved A/B: run the base side with this interpreter (another torch/TF/JAX environment); alone, "
             "the base side is this tree in that interpreter. Default: the head's interpreter.")
    add("--perf-ab-timeout", type=parse_seconds, default=600.0, metavar="SECONDS",
        help="seconds the A/B base worker may take to answer one request (a build may take 30 min) before it is "
             "killed as hung. Default: 600.")
    add("--perf-confirm", type=_choice("confirm mode", CONFIRM_MODES), default="ab", metavar="MODE",
        help="what a flag of the stored-baseline gate (latency, peak memory, compile time) goes through before it "
             "fails the test: 'ab' measures the case again as interleaved A/B against the commit of the baseline's "
             "latest run and fails only when the A/B confirms (diffperf/ab_confirm.py), 'off' fails on the flag. "
             "Default: ab.")
    add("--perf-ab-max-time", type=parse_seconds, default=600.0, metavar="SECONDS",
        help="A/B: the most seconds one case's further process pairs (their workers' start, builds and rounds) take in "
             "all; once spent no further pair starts, a pair's rounds stop at what is left, and the verdict rests on "
             "the pairs that ran (inconclusive when undecided, named in the message). The first pair's rounds keep "
             "--perf-max-time. Default: 600."),
    add("--perf-ab-process-cv", type=parse_fraction("A/B process CV", 0.5), default=0.01, metavar="FRACTION",
        help="A/B: standard deviation of the fixed speed offset between two processes of the same tree (no number "
             "of pairs averages it away). Across process pairs it is the prior of their spread, weighed as 4 pairs; "
             "with --perf-ab-processes 1 it is added to the pairs' interval (0 trusts the pairs alone). A case whose "
             "baseline entry holds 5 or more A/A first pairs made after the same builds as this run's (python -m "
             "diffperf baseline offsets) judges its first pair with their measured spread instead. Measure yours "
             "with benchmarks/ab_calibration.py. Default: 0.01.")
    add("--perf-ab-processes", type=_positive_int("A/B process pairs"), default=AB_PROCESSES, metavar="N",
        help="A/B: the most process pairs a case is measured in. The first is this process and the base worker; "
             "each further pair is a fresh head process and a fresh base process, added while the verdict across "
             f"the pairs is inconclusive (at least 2), because one pair's fixed speed offset looks like a change "
             "(diffperf/ab_replicate.py). 1: one pair, judged with --perf-ab-process-cv alone. "
             f"Default: {AB_PROCESSES}.")
    add("--perf-select", default=None, metavar="FILE",
        help="run only the node ids listed in FILE, one a line (used by python -m diffperf launch). Default: all.")
    add("--perf-dist-group", type=_choice("dist group", DIST_GROUPS), default="framework", metavar="UNIT",
        help="under pytest-xdist (-n), what one worker runs together: 'framework' (all cases of a stack, so its "
             "compile caches stay warm) or 'case' (a case's tests, spreading one stack over several GPUs). "
             "Default: framework.")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _cache_dir(config: pytest.Config) -> Path:
    opt = config.getoption("perf_cache_dir")
    return Path(opt).resolve() if opt else Path(config.rootpath) / ".diffperf-cache"


def configure_caches(cache: Path, frameworks: tuple[str, ...]) -> None:
    """Point every compiler's persistent cache at ``cache`` (before any framework is imported)."""
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DIFFPERF_CACHE_DIR", str(cache))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "torchinductor"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache / "jax"))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU
    tf_flags = os.environ.get("TF_XLA_FLAGS", "")
    if "tf_xla_persistent_cache_directory" not in tf_flags:
        os.environ["TF_XLA_FLAGS"] = f"{tf_flags} --tf_xla_persistent_cache_directory={cache / 'tf-xla'}".strip()
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # so does TensorFlow
    # diffusers/transformers' TensorFlow classes are never used (KerasCV has its own models).
    os.environ.setdefault("USE_TF", "0")
    if "jax" not in frameworks:
        os.environ.setdefault("USE_FLAX", "0")


def _atomic_run_storage(config: pytest.Config) -> None:
    """Make pytest-benchmark's ``--benchmark-save`` write through a temp file and a rename.

    Note: pytest-benchmark's ``FileStorage.save`` opens the final file and writes into it, so a crash
    mid-write would leave a truncated run that later comparisons choke on; the subclass below only
    changes how the bytes reach the disk (same file name, numbering and content).
    """
    bs = getattr(config, "_benchmarksession", None)
    storage = getattr(bs, "storage", None)
    try:
        from pytest_benchmark.storage.file import FileStorage
        from pytest_benchmark.utils import safe_dumps
    except ImportError:  # pragma: no cover
        return
    if type(storage) is not FileStorage:
        return

    class AtomicFileStorage(FileStorage):
        def save(self, output_json, save):
            from diffperf.fileio import atomic_write_text

            output_file = self.get(f"{self._next_num}_{save}.json")
            if output_file.exists():
                raise FileExistsError(f"refusing to overwrite saved run {output_file}")
            atomic_write_text(output_file, safe_dumps(output_json, ensure_ascii=True, indent=4))
            self.logger.info(f"Saved benchmark data in: {output_file}")

    storage.__class__ = AtomicFileStorage


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    for device, reason in (("cpu", "runs on the CPU"), ("cuda", "needs a CUDA GPU"), ("tpu", "needs a TPU VM")):
        config.addinivalue_line("markers", f"{device}: benchmark case that {reason}")
    config.addinivalue_line("markers", "perf_tolerance(fraction): per-test latency tolerance for the regression gate")
    distributed.configure(config, _cache_dir(config))  # a worker is pinned to its GPU here, before any build
    configure_caches(_cache_dir(config), config.getoption("perf_frameworks"))
    from diffperf import malloc

    malloc.configure(config.getoption("perf_malloc"))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:

        def sink(line: str) -> None:
            # Progress must reach the terminal while a test's output is being captured.
            if capman is not None:
                with capman.global_and_fixture_disabled():
                    reporter.write_line(line)
            else:
                reporter.write_line(line)

        progress.sink = sink
    config._diffperf_session = PerfSession(config)  # type: ignore[attr-defined]
    _atomic_run_storage(config)
    from diffperf import results

    results.configure(config, _cache_dir(config))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one xdist worker per visible GPU (diffperf/distributed.py)."""
    return distributed.auto_num_workers(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    progress.sink = None


def _session(config: pytest.Config) -> PerfSession:
    return config._diffperf_session  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------


def recipes_for(framework: str, device: str, selected: tuple[str, ...] | None):
    """The recipes of ``framework`` to run on ``device``: the selection, or the framework's default."""
    spec = framework_spec(framework)
    if selected is None:
        return resolve_recipes(framework, [spec.defaults[device].recipes])
    names = []
    for item in selected:
        fw, sep, name = item.partition(":")
        if sep:
            if fw == framework:
                names.append(name)
        elif item in spec.named:
            names.append(item)
        else:
            try:
                spec.recipe_cls.from_tag(item)
            except RecipeError:
                continue
            names.append(item)
    return resolve_recipes(framework, names)


def conditions_for(config: pytest.Config, framework: str, device: str) -> dict:
    """Preset, steps, resolution, batch sizes, guidance and negative prompt of ``framework`` on ``device``.

    The options win; what they leave open comes from the framework's default :class:`~diffperf.cases.Conditions`
    for the device (its seed's stated conditions) when the preset is that default's, else from the preset.
    """
    cond = framework_spec(framework).defaults[device]
    preset_opt = config.getoption("perf_preset")
    weights = config.getoption("perf_weights")
    preset_name = cond.preset if preset_opt == "auto" else preset_opt
    if weights is not None and framework == "torch" and preset_opt == "auto":
        from pipelines.torch_diffusers import preset_of_folder

        preset_name = preset_of_folder(weights)
    seeded = preset_name == cond.preset
    preset = get_preset(preset_name)
    resolution = config.getoption("perf_resolution") or (cond.resolution if seeded else None)
    return dict(
        preset=preset_name,
        steps=config.getoption("perf_steps") or (cond.steps if seeded and cond.steps else preset.default_steps),
        height=resolution[0] if resolution else None, width=resolution[1] if resolution else None,
        batch_sizes=config.getoption("perf_batch_size") or ((cond.batch_size,) if seeded else (1,)),
        guidance_scale=cond.guidance_scale if seeded else None,
        negative_prompt=cond.negative_prompt if seeded else None,
    )


def build_cases(config: pytest.Config) -> list:
    """Every (case, marks) the options select, including the ones that will be skipped (with reasons)."""
    params = []
    weights = config.getoption("perf_weights")
    for framework in config.getoption("perf_frameworks"):
        installed = hardware.framework_installed(framework)
        spec = framework_spec(framework)
        for device in DEVICES:
            if device not in spec.defaults:
                continue  # the stack does not target this device at all (e.g. PyTorch on TPU)
            cond = conditions_for(config, framework, device)
            try:
                recipes = recipes_for(framework, device, config.getoption("perf_recipes"))
            except RecipeError as exc:
                raise pytest.UsageError(f"--perf-recipes: {exc}") from None
            for recipe in recipes:
                for bs in cond["batch_sizes"]:
                    try:
                        case = Case(
                            framework=framework, recipe=recipe, preset=cond["preset"], device=device, batch_size=bs,
                            steps=cond["steps"], height=cond["height"], width=cond["width"],
                            seed=config.getoption("perf_seed"),
                            weights=str(weights) if weights is not None and framework == "torch" else None,
                            guidance_scale=cond["guidance_scale"], negative_prompt=cond["negative_prompt"],
                        )
                    except RecipeError as exc:
                        raise pytest.UsageError(f"invalid combination for {framework}/{device}: {exc}") from None
                    marks = [getattr(pytest.mark, device)]
                    reason = (
                        None if installed else
                        f"{framework} stack not installed: pip install -e '.[{hardware.EXTRA_FOR[framework]}]'"
                    ) or hardware.skip_reason(device) or matrix_skip_reason(case)
                    if weights is not None and framework != "torch":
                        reason = reason or f"--perf-weights loads diffusers PyTorch folders; the {framework} stack uses random weights"
                    if reason:
                        marks.append(pytest.mark.skip(reason=reason))
                    known = recipe.known_failure(device)
                    if known:
                        expected = recipe.known_failure_raises(device)
                        if expected is None:
                            raise RecipeError(f"{framework} recipe {recipe.tag()!r}: known_failure without known_failure_raises")
                        marks.append(pytest.mark.xfail(reason=known, strict=True,
                                                       raises=pytest.RaisesExc(check=expected.matches)))
                    params.append(pytest.param(case, marks=marks, id=case.full_id))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "perf_case" in metafunc.fixturenames:
        metafunc.parametrize("perf_case", build_cases(metafunc.config), indirect=True, scope="module")


# --------------------------------------------------------------------------------------------------
# Session state, fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def perf_session(pytestconfig: pytest.Config) -> PerfSession:
    """The run's :class:`PerfSession`."""
    return _session(pytestconfig)


@pytest.fixture
def perf_case(request: pytest.FixtureRequest, perf_session: PerfSession):
    """A built pipeline for one case (module-scoped through parametrization; see module docstring)."""
    from diffperf.harness import prepare

    case: Case = request.param
    if not case.is_reference:
        perf_session.build_reference(case)  # before the case: never both on the device at once
    try:
        prepared = prepare(case, **perf_session.ab_hooks(case, request.session))
    except BaseException:
        perf_session.ab_cancel(case)
        raise
    if case.is_reference:
        perf_session.references.setdefault(case, prepared.generation)
    try:
        yield prepared
    finally:
        prepared.close()
        perf_session.ab_cancel(case)  # a base build held for this case's latency test, which did not run


def pytest_collection_finish(session: pytest.Session) -> None:
    """With A/B on, start the base worker and import the first case's stack on both sides at once."""
    perf = getattr(session.config, "_diffperf_session", None)
    if perf is not None and not session.config.option.collectonly:
        perf.start_ab(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    perf = getattr(session.config, "_diffperf_session", None)
    if perf is not None:
        perf.close_ab()
    if perf is not None:
        from diffperf.harness import release_shared

        release_shared()
    if perf is not None and perf.gate is not None:
        from diffperf.baselines import BaselineError

        try:
            for path in perf.gate.finish():
                progress.say(f"baselines written: {path}")
        except BaselineError as exc:
            progress.say(f"baselines NOT written: {exc}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add framework versions, GPU model/count/driver, CPU model and hardware ids."""
    from diffperf import malloc

    machine_info.update(hardware.machine_info())
    machine_info["malloc"] = malloc.current()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    perf = getattr(config, "_diffperf_session", None)
    if perf is None or not perf.records:
        return
    terminalreporter.section("diffperf results")
    for line in results_table(perf.records):
        terminalreporter.write_line(line)
    bs = getattr(config, "_benchmarksession", None)
    if bs is not None and (bs.save or bs.autosave):
        where = Path(str(bs.storage.path)) / (bs.storage.default_machine_id or "")
        terminalreporter.write_line(f"run saved under: {where}  (compare two runs: python -m diffperf compare BASE HEAD)")
    elif bs is not None:
        terminalreporter.write_line("run not saved: add --benchmark-autosave or --benchmark-save=NAME to keep it")
