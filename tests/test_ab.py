"""Interleaved A/B (diffperf/ab.py, diffperf/ab_worker.py): statistics, pair orders, the worker, the plugin path.

The end-to-end tests build a small git repository inside the pytester folder: a copy of this tree's
``diffperf`` and ``pipelines`` whose torch builder is the fake builder of ``conftest.py`` (a fake
asynchronous device), tagged and timed differently in its base commit and its head commit, so the base
worker's imports are checked by behaviour as well as by file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from diffperf import ab
from tests.conftest import FAKE_BUILDER, REPO

RUN = ["test_perf.py", "-k", "latency", "--perf-frameworks", "torch", "--perf-recipes", "torch:fp32-sdpa",
       "--perf-no-fidelity", "--perf-reference", "off", "--perf-warmup-rounds", "1", "--perf-rounds", "12",
       "--perf-max-time", "6", "-p", "no:randomly", "-p", "no:cacheprovider"]

# The fake builder, plus a tag, a duration scale and failure hooks keyed by the tag.
AB_BUILDER = FAKE_BUILDER + r'''
BUILDER_TAG = "{tag}"
SCALE = {scale}
_calls = [0]
_generate = FakeRunner.generate


import sys as _sys

# A fixed speed offset of the test process alone (A/B workers run diffperf_ab_worker.py): what a process's
# memory layout does to a real pipeline, here by construction.
_IN_WORKER = "diffperf_ab_worker" in _sys.argv[0]
_OFFSET = 1.0 if _IN_WORKER else float(os.environ.get("FAKE_AB_TEST_PROCESS_OFFSET", "1"))
# A first call's extra seconds (a compile), and the test process' own factor on it (another job busy while
# it compiled); a commit may set COMPILE_FACTOR (its code compiles longer).
COMPILE_FACTOR = 1.0
_COMPILE_OFFSET = 1.0 if _IN_WORKER else float(os.environ.get("FAKE_AB_TEST_PROCESS_COMPILE", "1"))


def _ab_generate(self):
    _calls[0] += 1
    mode = os.environ.get("FAKE_AB_FAIL_" + BUILDER_TAG, "")
    if mode == "crash" and _calls[0] > 3:
        os._exit(3)
    if mode == "hang" and _calls[0] > 3:
        time.sleep(3600)
    first, self._called = not getattr(self, "_called", False), True
    compile_s = float(os.environ.get("FAKE_COMPILE_S", "0")) * COMPILE_FACTOR * _COMPILE_OFFSET if first else 0.0
    self.duration = float(os.environ.get("FAKE_DURATION", "0.02")) * SCALE * _OFFSET + compile_s
    log = os.environ.get("FAKE_AB_BUILD_LOG")
    if first and log:  # a first call that works on the host (tracing, a compile), logged like a build
        start = time.time()
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write(f"first {{os.getpid()}} {{start}} {{time.time()}}\n")
    return _generate(self)


FakeRunner.generate = _ab_generate
_build = build


def build(case):
    if os.environ.get("FAKE_AB_FAIL_" + BUILDER_TAG) == "oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    log = os.environ.get("FAKE_AB_BUILD_LOG")
    start = time.time()
    if log:
        time.sleep(1.0)
    runner = _build(case)
    if log:
        with open(log, "a") as fh:
            fh.write(f"build {{os.getpid()}} {{start}} {{time.time()}}\n")
    return runner
'''


def _git(path: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True, env=env).stdout


def _worktrees(path: Path) -> list[str]:
    return [ln for ln in _git(path, "worktree", "list", "--porcelain").splitlines() if ln.startswith("worktree ")]


@pytest.fixture
def ab_repo(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """A git repo in the pytester folder: commit 1 is the base (builder tag "base", scale ``BASE_SCALE``),
    the working tree and commit 2 the head (tag "head", scale 1.0); a commit 0 has no suite."""
    root = pytester.path
    _git(root, "init", "-q", "-b", "main")
    (root / "README.txt").write_text("no suite yet\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "no suite")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "diffperf", root / "diffperf", ignore=ignore)
    shutil.copytree(REPO / "pipelines", root / "pipelines", ignore=ignore)
    (root / "test_perf.py").write_text((REPO / "perf" / "test_pipelines.py").read_text())
    pytester.makeini("[pytest]\naddopts = -p diffperf.plugin --strict-markers\n")
    (root / ".gitignore").write_text(".benchmarks/\n.diffperf-cache/\n*.json\n*.jsonl\n__pycache__/\n")

    def commit(tag: str, scale: float) -> None:
        (root / "pipelines" / "torch_diffusers.py").write_text(AB_BUILDER.format(tag=tag, scale=scale))
        _git(root, "add", "-A")
        _git(root, "commit", "-q", "-m", tag)

    commit("base", 2.0)
    commit("head", 1.0)
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setenv("FAKE_DURATION", "0.02")
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(var, raising=False)
    return pytester


def _bench(pytester: pytest.Pytester) -> dict:
    data = json.loads((pytester.path / "out.json").read_text())
    (bench,) = data["benchmarks"]
    return bench


# --------------------------------------------------------------------------------------------------
# Statistics and pair orders (pure)
# --------------------------------------------------------------------------------------------------


def _pairs(ratio: float, n: int, noise: float, seed: int, drift: float = 0.3):
    """Paired rounds: a machine speed drifting by ``drift`` over the run, ``noise`` per round, head = ratio x base."""
    rng = np.random.default_rng(seed)
    speed = 1 + drift * np.linspace(0, 1, n) ** 2
    base = 0.1 * speed * np.exp(rng.normal(0, noise, n))
    head = 0.1 * ratio * speed * np.exp(rng.normal(0, noise, n))
    return list(head), list(base)


@pytest.mark.parametrize("ratio, verdict", [(1.10, "regressed"), (0.90, "improved"), (1.0, "unchanged")])
def test_known_ratio_gives_the_verdict(ratio, verdict):
    for seed in range(5):
        head, base = _pairs(ratio, 40, 0.02, seed)
        cmp = ab.paired_compare(head, base, tolerance=0.03, alpha=0.01, process_cv=0)
        assert cmp.verdict == verdict, (seed, cmp)
        assert cmp.ci_low <= cmp.ratio <= cmp.ci_high
        assert abs(cmp.ratio / ratio - 1) < 0.03
        assert cmp.min_detectable < 0.03
        assert cmp.decided


def test_drift_between_pairs_does_not_make_a_regression():
    # The machine gets 30 % slower over the run: unpaired, the head's late rounds look slower than the
    # base's early ones; paired, every ratio sees one machine speed and A/A stays "unchanged".
    head, base = _pairs(1.0, 40, 0.01, 7, drift=0.3)
    assert ab.paired_compare(head, base, tolerance=0.03, alpha=0.01, process_cv=0).verdict == "unchanged"
    assert ab.paired_compare(head, base, tolerance=0.05, alpha=0.01).verdict == "unchanged"
    from diffperf import stats

    assert stats.compare_samples(head[20:], base[:20], tolerance=0.03, alpha=0.01).verdict == "regressed"


def _offset_pairs(ratio: float, spread: float, n: int = 40):
    """Pairs whose log-ratios are log(ratio) plus an even spread of +-``spread``, on a drifting machine."""
    base = 0.1 * (1 + 0.3 * np.linspace(0, 1, n) ** 2)
    return list(base * ratio * np.exp(np.linspace(-spread, spread, n))), list(base)


@pytest.mark.parametrize("spread", [0.02, 0.03])
def test_a_fixed_offset_between_two_processes_is_not_a_regression_but_twice_the_tolerance_is(spread):
    # Measured A/A: two processes of one tree differ by a fixed offset (sd 0.9 %, up to 2.3 %) that every pair
    # carries, so the pairs alone call it significant. The between-process term keeps a 2.3 % offset at a 3 %
    # tolerance from failing, while the calibration's 6 % slowdown (5 % of the call) still fails.
    head, base = _offset_pairs(1.023, spread)
    assert ab.paired_compare(head, base, tolerance=0.03, alpha=0.01, process_cv=0).verdict == "regressed"
    cmp = ab.paired_compare(head, base, tolerance=0.03, alpha=0.01)
    assert cmp.verdict == "inconclusive" and cmp.ci_low < 1 < cmp.ci_high and cmp.process_cv == ab.PROCESS_CV
    assert cmp.min_detectable > 0.03  # one process a side cannot promise to detect 3 % at alpha 0.01
    assert cmp.decided  # more pairs would hardly narrow the interval: the sequential loop stops
    assert "between-process offset" in cmp.describe()
    assert ab.paired_compare(*_offset_pairs(1.05, spread), tolerance=0.03, alpha=0.01).verdict == "regressed"
    assert ab.paired_compare(*_offset_pairs(1 / 1.05, spread), tolerance=0.03, alpha=0.01).verdict == "improved"


def _process_pairs(change: float, rng: np.random.Generator, most: int = 12, slow: float = 0.05, p_slow: float = 0.2):
    """One case measured as ab_replicate does it, on simulated processes: each process runs ``slow`` slower
    with probability ``p_slow`` (fixed for its life: the fp32-classic A/A offsets measured on the CI VM fall
    near 1.00 or 5 % either side), rounds with 1 % noise on a drifting machine. Returns (first pair's own
    comparison, the comparison across pairs)."""
    from diffperf import ab_replicate

    blocks = []
    while True:
        h_off, b_off = (1 + slow * (rng.random() < p_slow) for _ in range(2))
        speed = 1 + 0.3 * rng.random(16)
        base = 0.1 * b_off * speed * np.exp(rng.normal(0, 0.01, 16))
        head = 0.1 * h_off * change * speed * np.exp(rng.normal(0, 0.01, 16))
        blocks.append(ab.paired_compare(list(head), list(base), tolerance=0.03, alpha=0.01, n_boot=400))
        if len(blocks) == 1 and ab_replicate.settles_alone(blocks[0]) is not None:  # never at a 3 % tolerance
            return blocks[0], ab_replicate.settles_alone(blocks[0])
        cmp = ab_replicate.combine(blocks, tolerance=0.03, alpha=0.01, process_cv=ab.PROCESS_CV)
        if len(blocks) >= most or (len(blocks) >= ab_replicate.MIN_PROCESSES and cmp.decided):
            return blocks[0], cmp


def test_process_pairs_tell_a_per_process_offset_from_a_regression():
    # Issue 11's bar on simulated processes. One pair a side (the first pair's own verdict) calls the offset
    # of a slow process a regression; across process pairs, A/A stays clear and a 6 % slowdown is caught.
    rng = np.random.default_rng(11)
    aa = [_process_pairs(1.0, rng) for _ in range(60)]
    slower = [_process_pairs(1.06, rng) for _ in range(60)]
    first_aa = sum(first.verdict == "regressed" for first, _ in aa)
    assert first_aa >= 6  # 16 % of single pairs have a slow head and a fast base
    assert sum(cmp.verdict == "regressed" for _, cmp in aa) <= 3  # 1-3 % (t-test at alpha 0.01, sequential)
    assert sum(cmp.verdict == "regressed" for _, cmp in slower) >= 54
    assert all(cmp.replicated and 2 <= cmp.processes <= 12 and len(cmp.block_ratios) == cmp.processes
               for _, cmp in aa + slower)
    # Processes that agree need no more than the minimum; disagreeing ones get more pairs.
    assert min(cmp.processes for _, cmp in slower) == 3 and max(cmp.processes for _, cmp in aa) > 3


def test_combine_needs_two_process_pairs_and_widens_when_they_disagree():
    from diffperf import ab_replicate

    def pair(ratio: float) -> ab.PairedComparison:
        return ab.paired_compare(*_offset_pairs(ratio, 0.005, n=20), tolerance=0.03, alpha=0.01)

    one = ab_replicate.combine([pair(1.5)], tolerance=0.03, alpha=0.01, process_cv=0.01)
    assert one.verdict == "inconclusive" and not one.decided and one.processes == 1  # even a 50 % change
    agree = ab_replicate.combine([pair(1.0), pair(1.002)], tolerance=0.03, alpha=0.01, process_cv=0.01)
    assert agree.verdict == "unchanged" and agree.decided and agree.pairs == 40
    # A change is called from three pairs on (two may share one slow process's offset).
    assert ab_replicate.combine([pair(1.5), pair(1.5)], tolerance=0.03, alpha=0.01, process_cv=0.01).verdict == "inconclusive"
    assert ab_replicate.combine([pair(1.5)] * 3, tolerance=0.03, alpha=0.01, process_cv=0.01).verdict == "regressed"
    assert ab_replicate.combine([pair(0.6)] * 3, tolerance=0.03, alpha=0.01, process_cv=0.01).verdict == "improved"
    apart = ab_replicate.combine([pair(1.05), pair(0.995)], tolerance=0.03, alpha=0.01, process_cv=0.01)
    assert apart.verdict == "inconclusive" and not apart.decided
    assert apart.ci_high / apart.ci_low > 1.1 > 1.07 > agree.ci_high / agree.ci_low
    assert "over 2 process pairs (1.050, 0.995; 40 pairs)" in apart.describe()
    # Two pairs that agree on +3 % (perhaps one slow head process each) do not fail the test: a third decides.
    tight = ab_replicate.combine([pair(1.03), pair(1.03)], tolerance=0.03, alpha=0.01, process_cv=0.01)
    assert tight.verdict == "inconclusive" and not tight.decided
    with pytest.raises(ValueError, match="no process pairs"):
        ab_replicate.combine([], tolerance=0.03, alpha=0.01, process_cv=0.01)


def test_replicate_adds_process_pairs_until_decided_or_the_limit_or_the_device_is_full(monkeypatch):
    from types import SimpleNamespace

    from diffperf import ab_replicate

    def block(index: int, ratio: float) -> ab_replicate.Block:
        head, base = _offset_pairs(ratio, 0.005, n=16)
        cmp = ab.paired_compare(head, base, tolerance=0.03, alpha=0.01)
        return ab_replicate.Block(index, ab.PairsResult(head, base, ["HB"] * 16, cmp, [], [], 1.0), 0, index, -index)

    ratios = iter([1.06, 0.95, 1.0, 1.05, 0.96, 1.0, 1.01, 0.99, 1.0, 1.0, 1.02])
    calls = []

    def fake_block(session, case, index, **kw):
        calls.append(index)
        return block(index, next(ratios))

    monkeypatch.setattr(ab_replicate, "measure_block", fake_block)
    prepared = SimpleNamespace(case=SimpleNamespace(device="cpu", id="c"), cold_peak_bytes=None)
    kw = dict(test_id="t", rounds=16, warmup_rounds=0, max_time_s=60, tolerance=0.03, alpha=0.01, inject_slowdown=0.0,
              process_cv=0.01)
    session = SimpleNamespace(settings=SimpleNamespace(processes=4))
    blocks, cmp, stopped = ab_replicate.replicate(session, prepared, block(1, 1.0), **kw)
    assert calls == [2, 3, 4] and len(blocks) == cmp.processes == 4 and stopped is None  # the limit
    assert cmp.verdict == "inconclusive" and not cmp.decided

    calls.clear()
    ratios = iter([1.0, 1.0])
    session.settings.processes = 12
    blocks, cmp, stopped = ab_replicate.replicate(session, prepared, block(1, 1.0), **kw)
    assert calls == [2] and cmp.verdict == "unchanged" and cmp.processes == 2  # decided: no more pairs

    def no_room(session, case, index, **kw):
        raise ab.AbDoesNotFit("the two sides of c do not fit on the GPU together")

    monkeypatch.setattr(ab_replicate, "measure_block", no_room)
    blocks, cmp, stopped = ab_replicate.replicate(session, prepared, block(1, 1.2), **kw)
    assert len(blocks) == 1 and cmp.verdict == "inconclusive"
    assert stopped == "stopped after 1 process pair(s): the two sides of c do not fit on the GPU together"


def test_one_pair_settles_unchanged_only_when_a_tripled_offset_still_rules_out_the_tolerance():
    from diffperf import ab_replicate

    def first(ratio: float, tolerance: float) -> ab.PairedComparison:
        return ab.paired_compare(*_offset_pairs(ratio, 0.005, n=20), tolerance=tolerance, alpha=0.01)

    settled = ab_replicate.settles_alone(first(1.01, 0.10))
    assert settled is not None and settled.verdict == "unchanged" and settled.processes == 1 and settled.decided
    assert settled.process_cv == 3 * ab.PROCESS_CV and settled.ci_low < 0.95 and settled.ci_high > 1.07
    assert "1 process pair (its interval allows a 3.0% between-process offset" in settled.describe()
    assert ab_replicate.settles_alone(first(1.04, 0.10)) is None  # a 10 % change could hide behind a 3 % offset
    assert ab_replicate.settles_alone(first(1.0, 0.03)) is None  # a 3 % tolerance always takes more pairs
    assert ab_replicate.settles_alone(first(1.5, 0.10)) is None  # a change is never called on one pair
    assert ab_replicate.settles_alone(ab.paired_compare(*_offset_pairs(1.0, 0.005, n=6), tolerance=0.1,
                                                        alpha=0.01)) is None  # fewer than MIN_PAIRS


def test_a_process_pair_takes_rounds_until_its_error_is_within_the_between_process_term_or_a_quarter_tolerance():
    from diffperf import ab_replicate

    head, base = _pairs(1.0, 24, 0.08, 1)  # 8 % noise a round: about 10 % a pair, as on the 2-core VM
    wide = ab.paired_compare(head, base, tolerance=0.10, alpha=0.01)
    assert 0.01 < wide.pairs_se <= 0.025 and wide.verdict != "regressed"
    assert ab_replicate.pair_done(wide)  # 10 % tolerance: 2.5 % is enough, another process pair buys more
    tight = ab.paired_compare(head, base, tolerance=0.03, alpha=0.01)
    assert not ab_replicate.pair_done(tight)  # 3 % tolerance: down to the 1 % between-process term
    head, base = _pairs(1.0, 24, 0.005, 4)
    assert ab_replicate.pair_done(ab.paired_compare(head, base, tolerance=0.03, alpha=0.01))


def test_too_few_noisy_pairs_are_inconclusive_and_say_what_they_could_detect():
    head, base = _pairs(1.0, 4, 0.10, 3)
    cmp = ab.paired_compare(head, base, tolerance=0.03, alpha=0.01)
    assert cmp.verdict == "inconclusive"
    assert cmp.min_detectable > 0.03 and not cmp.decided
    with pytest.raises(ValueError, match="differ in length"):
        ab.paired_compare([1.0, 1.0], [1.0])


def test_pair_orders_are_seeded_and_both_orders_occur():
    a = ab.pair_orders(np.random.default_rng(ab.order_seed(0, "t::x")), 40)
    b = ab.pair_orders(np.random.default_rng(ab.order_seed(0, "t::x")), 40)
    c = ab.pair_orders(np.random.default_rng(ab.order_seed(1, "t::x")), 40)
    assert a == b and a != c
    assert set(a) == {"HB", "BH"}
    assert 8 <= a.count("HB") <= 32


def test_run_pairs_alternates_one_side_at_a_time_and_stops_when_decided():
    log = []
    rng = np.random.default_rng(0)

    def side(name, scale):
        def round_():
            log.append(name)
            return 0.1 * scale * float(np.exp(rng.normal(0, 0.005)))
        return round_

    res = ab.run_pairs(side("H", 1.2), side("B", 1.0), min_pairs=10, warmup_rounds=2, max_time_s=60, tolerance=0.03,
                       alpha=0.01, seed=5)
    assert log[:4] == ["H", "B", "H", "B"]  # warmup alternates
    pairs = ["".join(log[4 + 2 * i: 6 + 2 * i]) for i in range(len(res.order))]
    assert pairs == res.order and set(res.order) == {"HB", "BH"}
    assert res.comparison.verdict == "regressed" and len(res.head) == len(res.base) == 10

    log.clear()
    res = ab.run_pairs(side("H", 1.0), side("B", 1.0), min_pairs=4, warmup_rounds=0, max_time_s=60, tolerance=0.03,
                       alpha=0.01, seed=5)
    assert res.comparison.decided and res.comparison.verdict == "unchanged" and len(res.head) > 4  # more pairs came


def test_run_pairs_stops_within_one_pair_of_its_time_limit_when_rounds_slow_down_mid_batch():
    # Measured with another job on the 2-core VM's cores: one process pair's rounds took 204 s of a 120 s
    # --perf-max-time, the batch sized from the pairs' mean time before the rounds slowed.
    now = [0.0]
    taken = []

    def side(name):
        def round_():
            taken.append(name)
            now[0] += 0.1 if len(taken) <= 40 else 1.5  # the machine slows after 20 pairs
            return 0.1
        return round_

    res = ab.run_pairs(side("H"), side("B"), min_pairs=10, warmup_rounds=0, max_time_s=6.0, tolerance=0.03,
                       alpha=0.01, seed=5, done=lambda cmp: False, clock=lambda: now[0])
    slow_pair = 2 * 1.5
    assert res.seconds < 6.0 + slow_pair  # the limit, overrun by at most the pair under way
    assert len(res.head) == len(res.base) == len(res.order) == len(taken) // 2  # whole pairs only
    # The minimum is taken whatever the limit: a pair's verdict needs it.
    now[0], taken[:] = 0.0, []
    short = ab.run_pairs(side("H"), side("B"), min_pairs=10, warmup_rounds=0, max_time_s=0.5, tolerance=0.03,
                         alpha=0.01, seed=5, done=lambda cmp: False, clock=lambda: now[0])
    assert len(short.head) == 10


# --------------------------------------------------------------------------------------------------
# The worker protocol
# --------------------------------------------------------------------------------------------------


def test_worker_protocol_and_import_isolation(ab_repo, tmp_path):
    root = ab_repo.path
    worktree = tmp_path / "base"
    _git(root, "worktree", "add", "--detach", str(worktree), "HEAD~1")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # The head's PYTHONPATH (the head tree) must not leak into the worker ahead of the base tree.
    worker = ab.BaseWorker(sys.executable, worktree, scratch, timeout_s=60, env=dict(os.environ, PYTHONPATH=str(root)))
    try:
        hello = worker.request("hello")
        assert Path(hello["diffperf_file"]).resolve().is_relative_to(worktree.resolve())
        assert Path(hello["pipelines_path"][0]).resolve().is_relative_to(worktree.resolve())
        assert "numpy" in hello["versions"]
        from diffperf.api import make_case

        built = worker.request("build", case=make_case("fp32-sdpa", steps=2).as_dict())
        assert Path(built["builder_file"]).resolve() == (worktree / "pipelines" / "torch_diffusers.py").resolve()
        assert built["cold_start_s"] >= 0.03  # the base builder: 0.02 s x 2.0, synchronized
        warm = worker.request("warm", rounds=2)["seconds"]
        assert len(warm) == 2 and min(warm) >= 0.03
        assert worker.request("round")["seconds"] >= 0.03
        assert worker.request("stats")["steady_peak_bytes"] == 1 << 20
        with pytest.raises(ab.AbWorkerError, match="unknown request 'dance'"):
            worker.request("dance")
        assert worker.request("round")["seconds"] > 0  # an error answer leaves the worker serving
        worker.request("release")
        with pytest.raises(ab.AbWorkerError, match="no case built"):
            worker.request("round")
    finally:
        worker.close()
    assert worker.proc.poll() == 0


# --------------------------------------------------------------------------------------------------
# The plugin path, end to end
# --------------------------------------------------------------------------------------------------


def test_ab_run_uses_the_base_tree_and_records_both_sides(ab_repo):
    # Two cases: one worker and one worktree serve both (the base pipeline is released between them).
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-base", "HEAD~1", "--benchmark-json", "out.json",
                                          "--perf-journal", "journal.jsonl", "--benchmark-save", "ab",
                                          "--perf-recipes", "torch:fp32-sdpa,torch:fp32-classic")
    # Base builder is 2x slower: the head "improved", which the pairs show beyond doubt.
    assert result.ret == 0, result.stdout.str()
    benches = json.loads((ab_repo.path / "out.json").read_text())["benchmarks"]
    assert len(benches) == 2 and all(b["extra_info"]["ab"]["verdict"] == "improved" for b in benches)
    assert benches[0]["extra_info"]["ab"]["base"]["diffperf_file"] == benches[1]["extra_info"]["ab"]["base"]["diffperf_file"]
    rec = next(b for b in benches if "sdpa" in b["name"])["extra_info"]
    a = rec["ab"]
    assert a["verdict"] == "improved" and 0.4 < a["ratio"] < 0.6
    assert a["ci"][0] <= a["ratio"] <= a["ci"][1] and a["p"] < 0.01
    # Three process pairs (the least that calls a change): this process + the base worker, then twice a fresh
    # head worker + a fresh base worker, each importing its own tree. The top-level samples are the first pair's.
    assert a["processes"] == len(a["blocks"]) == 3 and a["replication_stopped"] is None
    first, second, _third = a["blocks"]
    assert first["order"] == a["order"] and first["head_samples_s"] == a["head_samples_s"]
    assert a["pairs"] == sum(b["pairs"] for b in a["blocks"]) == sum(len(b["order"]) for b in a["blocks"])
    assert len(a["order"]) == len(a["base_samples_s"]) == len(a["head_samples_s"]) >= 12
    assert first["head_pid"] != second["head_pid"] and first["base_pid"] != second["base_pid"]
    assert Path(second["head_builder_file"]).resolve() == (ab_repo.path / "pipelines" / "torch_diffusers.py").resolve()
    assert "/base/" in second["base_builder_file"] and "diffperf-ab-" in second["base_builder_file"]
    assert all(0.4 < b["ratio"] < 0.6 for b in a["blocks"])
    assert set(a["order"]) == {"HB", "BH"}
    assert a["head_samples_s"] == rec["samples_s"] == next(b for b in benches if "sdpa" in b["name"])["stats"]["data"]
    assert a["base_commit"]["id"] == _git(ab_repo.path, "rev-parse", "HEAD~1").strip()
    assert a["head_commit"]["id"] == _git(ab_repo.path, "rev-parse", "HEAD").strip()
    assert "/base/" in a["base"]["builder_file"] and "diffperf-ab-" in a["base"]["builder_file"]
    for side in ("head", "base"):
        s = a[side]
        assert s["versions"]["numpy"] and s["cold_start_s"] > 0 and s["peak_memory_bytes"]["steady"] == 1 << 20
        assert isinstance(s["first_in_process"], bool)  # the memory context, from the worker's build too
    assert a["memory_verdict"] == "unchanged"
    # The plugin's device-sharing settings reach the base worker too.
    assert a["base"]["device_env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert a["base"]["device_env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert min(a["base_samples_s"]) >= 0.035 and max(a["head_samples_s"]) < min(a["base_samples_s"])
    result.stdout.fnmatch_lines(["*diffperf results*", "*A/B*", "*improved 0.5*"])
    assert _worktrees(ab_repo.path) == [f"worktree {ab_repo.path}"]
    assert (ab_repo.path / "journal.jsonl").is_file()

    # python -m diffperf compare renders the saved A/B run on its own (terminal and markdown).
    out = subprocess.run([sys.executable, "-m", "diffperf", "compare", "0001", "--storage", ".benchmarks",
                          "--markdown", "ab.md"], cwd=ab_repo.path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "A/B: head" in out.stdout and "ratio [CI]" in out.stdout and "2 improved" in out.stdout
    md = (ab_repo.path / "ab.md").read_text()
    assert "### diffperf A/B" in md and ":green_circle: improved" in md


def _spans(log: Path) -> list[tuple[str, int, float, float]]:
    return [(kind, int(pid), float(a), float(b)) for kind, pid, a, b in (ln.split() for ln in log.read_text().splitlines())]


def test_a_further_process_pairs_two_workers_build_at_once_and_make_their_first_calls_one_at_a_time(ab_repo,
                                                                                                  monkeypatch):
    # Measured on the 2-core VM: two workers building tiny fp32 classic and making its first call at once took
    # 30.8 s, each first call 12.0 s against 0.17 s alone: the pair's compile figures then measure the contention.
    # A build is mostly one thread (TF tiny: Keras traces its models in Python for 7.5-9 s), so the two builds
    # overlap, and each first call runs while the other worker waits.
    log = ab_repo.path / "builds.log"
    monkeypatch.setenv("FAKE_AB_BUILD_LOG", str(log))
    monkeypatch.setenv("FAKE_AB_TEST_PROCESS_OFFSET", "1.05")  # the first pair does not settle alone
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-python", sys.executable, "--benchmark-json", "out.json",
                                          "--perf-ab-processes", "3")
    assert result.ret == 0, result.stdout.str()
    a = _bench(ab_repo)["extra_info"]["ab"]
    assert a["processes"] >= 2
    spans = _spans(log)
    assert len({pid for _, pid, _, _ in spans}) >= 4  # the test process, the base worker, a further pair's two
    for kind, pid, start, end in spans:
        if kind == "first":  # nothing else runs while a first call is timed
            assert all(e <= start or s >= end for _, p, s, e in spans if p != pid), (pid, spans)
    for block in a["blocks"][1:]:  # a further pair's two builds overlap
        (h,), (b,) = ([(s, e) for k, p, s, e in spans if k == "build" and p == block[side]]
                      for side in ("head_pid", "base_pid"))
        assert max(h[0], b[0]) < min(h[1], b[1]), (h, b)


def test_the_base_worker_builds_beside_the_test_process_and_makes_its_first_call_alone(ab_repo, monkeypatch):
    # Measured on the 2-core VM: the base worker's "build and first call" ran after the head's, nothing beside it
    # (TF graph tiny 9.4-10.4 s a run, of which Keras' tracing in Python about 7 s). The two builds overlap; each
    # first call (cold start, compile) runs while the other side waits.
    log = ab_repo.path / "builds.log"
    monkeypatch.setenv("FAKE_AB_BUILD_LOG", str(log))
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-base", "HEAD", "--perf-ab-processes", "1",
                                          "--benchmark-json", "out.json")
    assert result.ret == 0, result.stdout.str()
    a = _bench(ab_repo)["extra_info"]["ab"]
    assert a["head"]["built_beside_other_side"] and a["base"]["built_beside_other_side"]
    spans = _spans(log)
    builds = [(pid, start, end) for kind, pid, start, end in spans if kind == "build"]
    assert sorted(kind for kind, *_ in spans) == ["build", "build", "first", "first"], spans
    (_, h0, h1), (_, b0, b1) = builds
    assert max(h0, b0) < min(h1, b1), builds  # the two builds at once
    for kind, pid, start, end in spans:
        if kind == "first":  # nothing else runs while a first call is timed
            assert all(e <= start or s >= end for _, p, s, e in spans if p != pid), (pid, spans)
    result.stdout.fnmatch_lines(["*A/B base *: build in the base worker (beside the head's)*",
                                 "*A/B base *: first call in the base worker: done*"])


def test_a_held_base_build_whose_latency_test_does_not_run_ends_its_worker(ab_repo, monkeypatch):
    # The head's first call of one case fails after both sides built it: the base worker, held before its first
    # call, is not left waiting; the next case starts a fresh worker and is measured as A/B, and the worktree goes.
    root = ab_repo.path
    builder = root / "pipelines" / "torch_diffusers.py"
    builder.write_text(builder.read_text() + """
_held_generate = FakeRunner.generate


def _fails_in_the_test_process(self):
    if "diffperf_ab_worker" not in _sys.argv[0] and self.case.recipe.attention == "classic":
        raise RuntimeError("head first call failed")
    return _held_generate(self)


FakeRunner.generate = _fails_in_the_test_process
""")
    run = [arg if arg != "torch:fp32-sdpa" else "torch:fp32-classic,torch:fp32-sdpa" for arg in RUN]
    result = ab_repo.runpytest_subprocess(*run, "--perf-ab-base", "HEAD~1", "--perf-ab-processes", "1",
                                          "--benchmark-json", "out.json")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*RuntimeError: head first call failed*", "*1 passed*1 error*"])
    (bench,) = json.loads((root / "out.json").read_text())["benchmarks"]
    assert "fp32-sdpa" in bench["name"] and bench["extra_info"]["ab"]["verdict"] == "improved"
    assert bench["extra_info"]["ab"]["base"]["built_beside_other_side"]
    assert _worktrees(root) == [f"worktree {root}"]


def test_a_held_build_is_ended_before_the_worker_is_asked_anything_else():
    # A worker held before its first call reads any line but "go" as "exit": the next case's imports end the
    # held build (its latency test did not take it) instead of being read as that line.
    session = ab.AbSession.__new__(ab.AbSession)
    closed = []
    worker = types.SimpleNamespace(close=lambda: closed.append("closed"), proc=types.SimpleNamespace(poll=lambda: None))
    session.worker, session._preloading, session.fatal = worker, None, "the next start fails here"
    session._held = ab._HeldBuild("case A", worker)
    session.preload("case B")
    assert closed == ["closed"] and session._held is None and session.worker is None


FAKE_STACK = """
import os, sys, time
_log = os.environ.get("FAKE_AB_IMPORT_LOG")
_start = time.time()
time.sleep(2.0)
if _log:
    with open(_log, "a") as fh:
        fh.write(f"{'worker' if 'diffperf_ab_worker' in sys.argv[0] else 'test'} {_start} {time.time()}\\n")
"""


def test_the_base_worker_imports_the_cases_stack_while_the_test_process_imports_it_then_both_build(ab_repo,
                                                                                                  monkeypatch):
    # Measured on the 2-core VM: the base worker imported torch for about 5.5 s and TF for about 2.5 s after the
    # test process had imported them, each run. Imports are one thread each: the two overlap, and nothing is built
    # (nor timed) on either side until both are done.
    root = ab_repo.path
    (root / "fake_stack.py").write_text(FAKE_STACK)
    builder = root / "pipelines" / "torch_diffusers.py"
    builder.write_text(builder.read_text() + '\nPRELOAD = (("fake_stack", ()),)\n')
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "the stack takes two seconds to import")
    imports, builds = root / "imports.log", root / "builds.log"
    monkeypatch.setenv("FAKE_AB_IMPORT_LOG", str(imports))
    monkeypatch.setenv("FAKE_AB_BUILD_LOG", str(builds))
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-base", "HEAD", "--perf-ab-processes", "1",
                                          "--benchmark-json", "out.json")
    assert result.ret == 0, result.stdout.str()
    rows = [line.split() for line in imports.read_text().splitlines()]
    assert sorted(side for side, *_ in rows) == ["test", "worker"]  # each process imported its stack once
    head, base = ((float(a), float(b)) for _, a, b in sorted(rows))
    assert max(head[0], base[0]) < min(head[1], base[1]), (head, base)  # at the same time
    first_build = min(start for _, _, start, _ in _spans(builds))
    assert first_build >= max(head[1], base[1]), (first_build, head, base)  # no build before both are done


def _held_build(monkeypatch, prepare, reply: str, can_hold: bool = True):
    """``Worker.build`` with ``hold``, the harness's ``prepare`` replaced (``can_hold``: it takes
    ``before_first_call``, else it is an older tree's); returns the worker's protocol lines."""
    import io

    from diffperf import ab_worker, harness
    from diffperf.cases import Case
    from pipelines.torch_recipes import TorchRecipe

    runner = types.SimpleNamespace(generate=lambda: None, synchronize=lambda: None,
                                   memory=types.SimpleNamespace(kind="fake"))
    done = types.SimpleNamespace(runner=runner, build_s=0.1, cold_start_s=0.2, cold_peak_bytes=1,
                                 first_in_process=True, close=lambda: None)

    def held(case, after_imports=None, before_first_call=None):
        return prepare({"before_first_call": before_first_call}) or done

    monkeypatch.setattr(harness, "prepare", held if can_hold else (lambda case: prepare({}) or done))
    monkeypatch.setattr(sys, "stdin", io.StringIO(reply))
    proto = io.StringIO()
    worker = ab_worker.Worker(proto)
    case = Case("torch", TorchRecipe.from_tag("fp32-sdpa"), "tiny", steps=2)
    try:
        answer = worker.build({"case": case.as_dict(), "hold": True})
        proto.write(json.dumps(answer) + "\n")
    except SystemExit as exc:
        proto.write(f"exit {exc.code}\n")
    return proto.getvalue().splitlines()


def test_a_held_build_answers_built_and_makes_its_first_call_only_on_go(monkeypatch):
    seen = []

    def prepare(kw):  # the pipeline is built, then the hold, then the first call
        seen.append("built")
        kw["before_first_call"]()
        seen.append("first call")

    lines = _held_build(monkeypatch, prepare, '{"cmd": "go"}\n')
    assert json.loads(lines[0]) == {"ok": True, "stage": "built"} and seen == ["built", "first call"]
    assert json.loads(lines[1])["cold_start_s"] == 0.2

    seen.clear()
    lines = _held_build(monkeypatch, prepare, '{"cmd": "close"}\n')  # the pair closed it: no first call
    assert [json.loads(lines[0]), json.loads(lines[1]), lines[2]] == [{"ok": True, "stage": "built"}, {"ok": True},
                                                                      "exit 0"]
    assert seen == ["built"]


def test_a_held_build_waits_for_its_queued_device_work_before_it_says_built(monkeypatch):
    # On a GPU a build leaves its weight init queued on the device: "built" said before it is done would let the
    # other worker's timed first call share the device with it.
    from diffperf import harness
    from diffperf.cases import Case
    from pipelines.torch_recipes import TorchRecipe

    events = []
    memory = types.SimpleNamespace(reset=lambda: None, peak_bytes=lambda: 1, kind="fake")
    runner = types.SimpleNamespace(memory=memory, synchronize=lambda: events.append("sync"),
                                   generate=lambda: events.append("first call"),
                                   generate_instrumented=lambda: (None, None), close=lambda: None)
    monkeypatch.setattr(harness, "import_stack", lambda case: None)
    monkeypatch.setattr(harness, "build", lambda case: events.append("build (queued)") or runner)
    harness.prepare(Case("torch", TorchRecipe.from_tag("fp32-sdpa"), "tiny", steps=2),
                    before_first_call=lambda: events.append("built"))
    assert events[:4] == ["build (queued)", "sync", "built", "sync"], events


def test_a_held_build_in_a_base_tree_that_cannot_stop_before_the_first_call_builds_only_on_go(monkeypatch):
    seen = []
    lines = _held_build(monkeypatch, lambda kw: seen.append(sys.stdin.read()), '{"cmd": "go"}\n', can_hold=False)
    assert json.loads(lines[0]) == {"ok": True, "stage": "built"}  # said before it builds: it builds alone, on go
    assert seen == [""] and json.loads(lines[1])["cold_start_s"] == 0.2  # "go" was read before prepare ran


class _RecordingAb:
    def __init__(self):
        self.calls = []

    def preload(self, case):
        self.calls.append(("base imports", case))

    def await_preload(self):
        self.calls.append(("wait", None))

    def start_build(self, case):
        self.calls.append(("base builds", case))

    def await_built(self):
        self.calls.append(("wait for the base build", None))


def _item(name: str, case, skipped: bool = False):
    mark = pytest.mark.skip(reason="no CUDA").mark if skipped else None
    return types.SimpleNamespace(originalname=name, callspec=types.SimpleNamespace(params={"perf_case": case}),
                                 get_closest_marker=lambda n: mark if n == "skip" else None)


def test_the_base_worker_imports_and_builds_only_a_case_whose_latency_test_runs(monkeypatch):
    import dataclasses

    from diffperf import harness
    from diffperf.cases import Case
    from pipelines.torch_recipes import TorchRecipe
    from diffperf.session import PerfSession

    skipped, fidelity_only, cpu = (Case("torch", TorchRecipe.from_tag(tag), "tiny", steps=2)
                                   for tag in ("fp32-classic", "fp32-sdpa", "bf16-sdpa"))
    gpu = dataclasses.replace(cpu, device="cuda")
    items = [_item("test_latency", skipped, skipped=True), _item("test_fidelity", fidelity_only),
             _item("test_latency", cpu), _item("test_fidelity", cpu), _item("test_latency", gpu)]
    perf = PerfSession.__new__(PerfSession)
    perf.ab = _RecordingAb()
    monkeypatch.setattr(harness, "import_stack", lambda case: perf.ab.calls.append(("test process imports", case)))
    perf.start_ab(items)  # before the first test: both sides import the first A/B case's stack at once
    assert perf.ab.calls == [("base imports", cpu), ("test process imports", cpu), ("wait", None)]
    perf.ab.calls.clear()
    session = types.SimpleNamespace(items=items)
    assert perf.ab_hooks(skipped, session) == {} and perf.ab_hooks(fidelity_only, session) == {}
    assert perf.ab.calls == []
    hooks = perf.ab_hooks(cpu, session)
    assert perf.ab.calls == [("base imports", cpu)]
    # prepare() calls them after its own imports, then between its build and its first call.
    hooks["after_imports"]()
    hooks["before_first_call"]()
    assert perf.ab.calls[1:] == [("base builds", cpu), ("wait for the base build", None)]
    perf.ab.calls.clear()
    # On a GPU the base builds after the head's first call (its peak says whether both fit): imports only.
    assert perf.ab_hooks(gpu, session) == {"after_imports": perf.ab.await_preload}
    perf.ab = None
    assert perf.ab_hooks(cpu, session) == {}
    perf.start_ab(items)  # no A/B: nothing to start


def test_ab_regression_fails_the_test(ab_repo):
    root = ab_repo.path
    (root / "pipelines" / "torch_diffusers.py").write_text(AB_BUILDER.format(tag="base", scale=0.7))
    _git(root, "commit", "-qam", "fast base")
    (root / "pipelines" / "torch_diffusers.py").write_text(AB_BUILDER.format(tag="head", scale=1.0))
    _git(root, "commit", "-qam", "slow head")
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-base", "HEAD~1", "--benchmark-json", "out.json")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*A/B latency regressed*", "*A/B regressed: head/base ratio 1.4*"])
    assert _bench(ab_repo)["extra_info"]["ab"]["verdict"] == "regressed"


def test_a_speed_offset_of_one_process_is_not_a_regression_across_process_pairs(ab_repo, monkeypatch):
    # The test process runs 12 % slower than any other process of the same tree (the A/A offsets of real
    # pipelines reach 5 %). One process pair calls that a regression; further pairs of fresh processes show
    # the offset belongs to one process, not to the code.
    monkeypatch.setenv("FAKE_AB_TEST_PROCESS_OFFSET", "1.12")
    args = [*RUN, "--perf-ab-python", sys.executable, "--benchmark-json", "out.json"]
    result = ab_repo.runpytest_subprocess(*args, "--perf-ab-processes", "1")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*A/B latency regressed*", "*A/B regressed: head/base ratio 1.1*"])
    assert _bench(ab_repo)["extra_info"]["ab"]["processes"] == 1

    result = ab_repo.runpytest_subprocess(*args)
    assert result.ret == 0, result.stdout.str()
    a = _bench(ab_repo)["extra_info"]["ab"]
    assert a["verdict"] in ("unchanged", "inconclusive") and a["processes"] >= 3
    first, *rest = a["blocks"]
    assert 1.08 < first["ratio"] < 1.16 and all(0.95 < b["ratio"] < 1.05 for b in rest)
    assert len({b["head_pid"] for b in a["blocks"]}) == len({b["base_pid"] for b in a["blocks"]}) == a["processes"]
    result.stdout.fnmatch_lines([f"*process pair {a['processes']}*"])


def test_a_first_pair_within_the_cases_stored_a_a_offsets_settles_on_one_process_pair(ab_repo, monkeypatch):
    # The test process runs 2.5 % slower than a worker of the same tree. With the --perf-ab-process-cv guess
    # one pair cannot rule out a 10 % change behind that, and fresh pairs follow. Once the case's A/A first
    # pairs are folded into its baseline entry (python -m diffperf baseline offsets), the first pair is judged
    # with their measured spread and settles alone.
    from diffperf.ab_offsets import KEY
    from diffperf.baselines import BaselineStore

    monkeypatch.setenv("FAKE_AB_TEST_PROCESS_OFFSET", "1.025")
    args = [*RUN, "--perf-baselines-dir", "baselines"]
    result = ab_repo.runpytest_subprocess(*args, "--perf-update-baselines")
    assert result.ret == 0, result.stdout.str()
    result = ab_repo.runpytest_subprocess(*args, "--perf-ab-base", "HEAD", "--benchmark-json", "aa.json")
    assert result.ret == 0, result.stdout.str()
    guessed = json.loads((ab_repo.path / "aa.json").read_text())["benchmarks"][0]["extra_info"]["ab"]
    assert guessed["processes"] >= 2 and guessed["offset_prior"] is None
    assert 1.01 < guessed["first_pair"]["ratio"] < 1.04 and guessed["first_pair"]["pairs"] >= 12
    out = subprocess.run([sys.executable, "-m", "diffperf", "baseline", "offsets", "aa.json", "--baselines-dir",
                          "baselines"], cwd=ab_repo.path, capture_output=True, text=True)
    assert out.returncode == 0 and "baselines written (ab_offsets)" in out.stdout, out.stderr
    (path,) = (ab_repo.path / "baselines").glob("*.json")
    store = BaselineStore.load(path)
    entry = store.get(_bench_id(ab_repo, "aa.json"))
    (folded,) = entry[KEY]
    assert folded["log_ratio"] == pytest.approx(np.log(guessed["first_pair"]["ratio"]), abs=1e-5)
    # Four more A/A runs' first pairs (stand-ins: each would be another run of the command above).
    entry[KEY] += [dict(folded, log_ratio=m, recorded_at=f"stand-in {i}") for i, m in enumerate([-0.01, 0.015, -0.005, 0.01])]
    store.put(entry)
    store.save()
    result = ab_repo.runpytest_subprocess(*args, "--perf-ab-base", "HEAD", "--benchmark-json", "out.json")
    assert result.ret == 0, result.stdout.str()
    a = _bench(ab_repo)["extra_info"]["ab"]
    assert a["verdict"] == "unchanged" and a["processes"] == 1 and len(a["blocks"]) == 1
    assert a["offset_prior"]["observations"] == 5 and 0.01 < a["offset_prior"]["sd"] < 0.02
    assert a["offset_prior"]["settled_first_pair"] and guessed["offset_prior"] is None
    result.stdout.fnmatch_lines(["*unchanged 1.0* n=*, 1 proc, A/A offsets*"])
    assert a["ci"][0] < a["ratio"] < a["ci"][1] and a["min_detectable_slowdown"] <= 0.10
    assert f"first-pair offset measured in baselines/{path.name}: 5 A/A first pairs" in a["message"]


def _bench_id(pytester: pytest.Pytester, name: str) -> str:
    (bench,) = json.loads((pytester.path / name).read_text())["benchmarks"]
    return bench["fullname"]


def test_further_process_pairs_are_kept_for_the_next_case_and_closed_at_the_end(ab_repo, monkeypatch):
    from diffperf.ab_replicate import POOL_PAIRS

    monkeypatch.setenv("FAKE_AB_TEST_PROCESS_OFFSET", "1.12")  # every case needs further pairs
    args = [*RUN, "--perf-recipes", "torch:fp32-sdpa,torch:fp32-classic", "--perf-ab-python", sys.executable,
            "--benchmark-json", "out.json"]
    result = ab_repo.runpytest_subprocess(*args)
    assert result.ret == 0, result.stdout.str()
    runs = [b["extra_info"]["ab"] for b in json.loads((ab_repo.path / "out.json").read_text())["benchmarks"]]
    assert len(runs) == 2 and all(a["processes"] >= 3 for a in runs)
    pids = [{b["index"]: (b["head_pid"], b["base_pid"]) for b in a["blocks"]} for a in runs]
    for index in range(1, 2 + POOL_PAIRS):  # the test process and base worker, then the pooled pairs: kept
        assert pids[0][index] == pids[1][index]
    for index in set(pids[0]) & set(pids[1]) - set(range(1, 2 + POOL_PAIRS)):  # further ones are started anew
        assert pids[0][index] != pids[1][index]
    for case_pids in pids:  # within a case every pair is its own two processes
        flat = [p for pair in case_pids.values() for p in pair]
        assert len(set(flat)) == len(flat)
    for pid in {p for case_pids in pids for pair in case_pids.values() for p in pair} - {os.getpid()}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert _worktrees(ab_repo.path) == [f"worktree {ab_repo.path}"]


def test_python_option_alone_runs_the_head_tree_in_that_interpreter(ab_repo):
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-python", sys.executable, "--benchmark-json", "out.json")
    assert result.ret == 0, result.stdout.str()
    a = _bench(ab_repo)["extra_info"]["ab"]
    assert a["verdict"] in ("unchanged", "inconclusive")  # A/A: the same tree on both sides
    assert 0.85 < a["ratio"] < 1.15
    assert a["base"]["python"] == sys.executable and a["base_commit"]["id"] == a["head_commit"]["id"]
    assert Path(a["base"]["builder_file"]).resolve() == (ab_repo.path / "pipelines" / "torch_diffusers.py").resolve()


@pytest.mark.parametrize("mode, message", [
    ("crash", "*A/B failed, head measured alone: A/B base worker*crashed (exit status 3) during 'round'*"),
    ("hang", "*A/B failed, head measured alone: A/B base worker*did not answer 'round' within 3 s*"),
])
def test_base_worker_crash_or_hang_keeps_the_head_and_removes_the_worktree(ab_repo, monkeypatch, mode, message):
    monkeypatch.setenv("FAKE_AB_FAIL_base", mode)
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-base", "HEAD~1", "--perf-ab-timeout", "3",
                                          "--benchmark-json", "out.json", "--perf-journal", "journal.jsonl")
    assert result.ret == 1
    result.stdout.fnmatch_lines([message])
    bench = _bench(ab_repo)
    assert bench["extra_info"]["ab"]["verdict"] == "error" and len(bench["stats"]["data"]) >= 12
    lines = [json.loads(ln) for ln in (ab_repo.path / "journal.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "case" and e.get("benchmark") for e in lines)
    assert _worktrees(ab_repo.path) == [f"worktree {ab_repo.path}"]
    assert not any(p.name.startswith("diffperf-ab-") and (p / "base").exists() for p in Path(ab_repo.path).iterdir())


@pytest.mark.parametrize("args, message", [
    (["--perf-ab-base", "no-such-branch"], "*--perf-ab-base 'no-such-branch': unknown revision*"),
    (["--perf-ab-base", "HEAD~2"], "*--perf-ab-base 'HEAD~2' (*): the revision has no diffperf suite (missing diffperf/harness.py*"),
    (["--perf-ab-python", "/nonexistent/bin/python"], "*--perf-ab-python /nonexistent/bin/python: no such executable interpreter*"),
    (["--perf-ab-timeout", "0"], "*seconds must be > 0*"),
    (["--perf-ab-max-time", "-5"], "*argument --perf-ab-max-time: seconds must be > 0, got '-5'*"),
])
def test_bad_ab_input_is_a_named_usage_error(ab_repo, args, message):
    result = ab_repo.runpytest_subprocess(*RUN, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert _worktrees(ab_repo.path) == [f"worktree {ab_repo.path}"]


def test_interpreter_without_the_stack_is_a_named_error(ab_repo, tmp_path):
    # A Python with nothing installed: the worker cannot import numpy; the head is still measured and kept.
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-python", str(venv / "bin" / "python"),
                                          "--benchmark-json", "out.json")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*A/B failed, head measured alone: the A/B base side (*bare/bin/python*) lacks the "
                                 "torch stack for tiny-fp32-sdpa-bs1-*No module named*"])
    assert _bench(ab_repo)["extra_info"]["ab"]["verdict"] == "error"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_removes_the_worktree_and_stops_the_worker(ab_repo, tmp_path, monkeypatch, sig):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch_root))
    monkeypatch.setenv("FAKE_AB_FAIL_base", "hang")
    # SIGINT restored in the child: a process started from a non-interactive shell may inherit it ignored.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import pytest; "
            "sys.exit(pytest.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *RUN, "--perf-ab-base", "HEAD~1"], cwd=ab_repo.path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    logs: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(scratch_root.glob("diffperf-ab-*/worker.log"))
        if logs and "first call" in logs[0].read_text(errors="replace"):
            break
        time.sleep(0.2)
    time.sleep(2.0)  # into the base worker's hanging round
    assert proc.poll() is None, proc.communicate()[0]
    worker_pids = _children(proc.pid)
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert _worktrees(ab_repo.path) == [f"worktree {ab_repo.path}"]
    assert not list(scratch_root.glob("diffperf-ab-*"))
    for pid in worker_pids:
        assert not _alive(pid), f"worker {pid} still running"


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_compare_of_a_run_without_ab_is_a_named_error(fake_suite):
    result = fake_suite.runpytest_subprocess("-k", "latency", "--perf-frameworks", "torch", "--perf-recipes",
                                             "torch:fp32-sdpa", "--perf-no-fidelity", "--perf-rounds", "3",
                                             "--perf-warmup-rounds", "0", "--benchmark-save", "plain")
    assert result.ret == 0
    out = subprocess.run([sys.executable, "-m", "diffperf", "compare", "0001", "--storage", ".benchmarks"],
                         cwd=fake_suite.path, capture_output=True, text=True)
    assert out.returncode == 2 and "carries no A/B results" in out.stderr


def test_results_table_has_an_ab_column():
    from diffperf.table import results_table

    rec = {"framework": "torch", "device": "cpu", "case": {"id": "tiny-x"}, "median_s": 0.1, "cv": 0.01,
           "cold_start_s": 0.2, "compile_s": None, "peak_memory_bytes": {"steady": 1 << 20}, "images_per_s": 10.0,
           "fidelity": None, "gate": {"verdict": "no baseline"}}
    assert "A/B" not in results_table([("t", rec)])[0]
    lines = results_table([("t", rec | {"ab": {"verdict": "regressed", "ratio": 1.061, "ci": [1.05, 1.07],
                                               "pairs": 24}}),
                           ("u", rec | {"ab": {"verdict": "error", "error": "crashed"}})])
    assert lines[0].split()[-1] == "A/B"
    assert lines[2].endswith("regressed 1.061 [1.050, 1.070] n=24") and lines[3].rstrip().endswith("error")


def test_ab_workflow_structure():
    from tests.test_workflows import load, steps

    wf = load("ab.yml")
    assert set(wf["on"]) == {"pull_request", "workflow_dispatch"} and "labeled" in wf["on"]["pull_request"]["types"]
    assert wf["permissions"] == {"contents": "read"}
    (job,) = wf["jobs"].values()
    assert "'perf'" in job["if"] and "head.repo.full_name == github.repository" in job["if"]
    (entry,) = job["strategy"]["matrix"]["include"]
    assert entry["runner"][0] == "self-hosted" and "gpu" in entry["runner"]
    checkout = next(s for s in steps(job) if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"] == {"fetch-depth": 0, "persist-credentials": False}
    text = "\n".join(s.get("run", "") for s in steps(job))
    assert '--perf-ab-base "$BASE_REV"' in text and "-m cuda" in text
    assert "python -m diffperf compare ab/run.json --markdown" in text and "$GITHUB_STEP_SUMMARY" in text
    assert "github.event.pull_request.base.sha" in job["env"]["BASE_REV"]


def test_a_case_whose_two_sides_do_not_fit_is_skipped_with_the_reason(ab_repo, monkeypatch):
    monkeypatch.setenv("FAKE_AB_FAIL_base", "oom")
    result = ab_repo.runpytest_subprocess(*RUN, "--perf-ab-base", "HEAD~1", "-rs")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*SKIPPED*the base side of tiny-fp32-sdpa-* does not fit on the device next to the "
                                 "head's pipeline: *CUDA out of memory*"])
    assert _worktrees(ab_repo.path) == [f"worktree {ab_repo.path}"]


def test_check_fits_compares_free_gpu_memory_with_the_heads_peak(monkeypatch):
    torch = pytest.importorskip("torch")
    from diffperf.api import make_case

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (3 << 30, 80 << 30))
    case = make_case("bf16-sdpa", device="cuda")
    ab.check_fits(case, 2 << 30)  # 2 GiB more fit in 3 GiB free
    with pytest.raises(ab.AbDoesNotFit, match=r"do not fit on the GPU together: .* peaked at 4.0 GiB, 3.0 GiB free"):
        ab.check_fits(case, 4 << 30)
    ab.check_fits(make_case("bf16-sdpa", device="cpu"), 4 << 30)  # CPU cases are not checked


@pytest.mark.parametrize("code_slower, expected, status", [(True, "confirmed", 1), (False, "machine drift", 0)])
def test_confirm_remeasures_gate_flags_as_ab(ab_repo, monkeypatch, code_slower, expected, status):
    root = ab_repo.path
    base = ["--perf-baselines-dir", str(root / "bl")]
    result = ab_repo.runpytest_subprocess(*RUN, *base, "--perf-update-baselines")
    assert result.ret == 0
    baseline_commit = _git(root, "rev-parse", "HEAD").strip()
    if code_slower:  # a real regression: the next commit's builder is 40 % slower
        (root / "pipelines" / "torch_diffusers.py").write_text(AB_BUILDER.format(tag="head", scale=1.4))
        _git(root, "commit", "-qam", "slower")
    else:  # the same code on a machine that became 40 % slower
        monkeypatch.setenv("FAKE_DURATION", "0.028")
    result = ab_repo.runpytest_subprocess(*RUN, *base, "--benchmark-json", "flagged.json", "--perf-confirm", "off")
    assert result.ret == 1
    gate = _bench_of(root / "flagged.json")["extra_info"]["gate"]
    assert gate["verdict"] == "regressed" and gate["baseline_commit"] == baseline_commit
    out = subprocess.run([sys.executable, "-m", "diffperf", "confirm", "flagged.json", "--markdown", "confirm.md", "--",
                          *RUN, *base], cwd=root, capture_output=True, text=True)
    assert out.returncode == status, out.stdout + out.stderr
    assert f"1 gate flag(s): {int(code_slower)} confirmed by A/B, {int(not code_slower)} machine drift" in out.stdout
    assert expected in out.stdout and baseline_commit[:12] in out.stdout
    assert "### diffperf: gate flags re-measured as A/B" in (root / "confirm.md").read_text()
    assert _worktrees(root) == [f"worktree {root}"]


@pytest.mark.parametrize("change, ret, outcome, verdict", [
    ("code", 1, "confirmed", "regressed"),  # the next commit's builder is 40 % slower
    ("inject", 1, "confirmed", "regressed"),  # --perf-inject-slowdown slows the head's calls only
    ("machine", 0, "machine drift", "unchanged"),  # the same code on a machine that became 40 % slower
])
def test_a_latency_flag_is_confirmed_inline_by_ab_against_the_baseline_commit(ab_repo, monkeypatch, change, ret,
                                                                               outcome, verdict):
    root = ab_repo.path
    base = ["--perf-baselines-dir", str(root / "bl")]
    assert ab_repo.runpytest_subprocess(*RUN, *base, "--perf-update-baselines").ret == 0
    baseline_commit = _git(root, "rev-parse", "HEAD").strip()
    extra = []
    if change == "code":
        (root / "pipelines" / "torch_diffusers.py").write_text(AB_BUILDER.format(tag="head", scale=1.4))
        _git(root, "commit", "-qam", "slower")
    elif change == "inject":
        extra = ["--perf-inject-slowdown", "0.4"]
    else:
        monkeypatch.setenv("FAKE_DURATION", "0.028")
    result = ab_repo.runpytest_subprocess(*RUN, *base, *extra, "--benchmark-json", "run.json")
    assert result.ret == ret, result.stdout.str()
    gate = _bench_of(root / "run.json")["extra_info"]["gate"]
    conf = gate["confirmation"]
    assert conf["outcome"] == outcome and conf["base_commit"] == baseline_commit and conf["pairs"] >= 12
    assert gate["verdict"] == verdict and gate.get("flag", "regressed") == "regressed"
    assert len(conf["head_samples_s"]) == len(conf["base_samples_s"]) == conf["blocks"][0]["pairs"]
    assert conf["processes"] == len(conf["blocks"]) and conf["pairs"] == sum(b["pairs"] for b in conf["blocks"])
    assert conf["processes"] == (1 if change == "machine" else 3)  # a 40 % change takes 3 pairs; the same code 1
    if change == "machine":
        assert f"not confirmed by interleaved A/B against baseline commit {baseline_commit[:12]} (machine drift, not " \
               "failing)" in _bench_of(root / "run.json")["extra_info"]["gate_message"]
        result.stdout.fnmatch_lines(["*torch-cpu-tiny-fp32-sdpa-bs1-4steps *unchanged (drift)†*", "† the gate flagged*"])
        assert conf["ratio"] < 1.1
    else:
        result.stdout.fnmatch_lines([f"*confirmed by interleaved A/B against baseline commit {baseline_commit[:12]}*"])
        assert conf["ratio"] > 1.25
        assert all(b["ratio"] > 1.25 for b in conf["blocks"])  # the injected slowdown reaches the head workers too
    assert _worktrees(root) == [f"worktree {root}"]


@pytest.mark.parametrize("change, ret, outcome", [
    ("process", 0, "machine drift"),  # the test process alone compiled 2x slower (another job, a slow phase)
    ("code", 1, "confirmed"),  # the next commit's code compiles 2x longer in every process
])
def test_a_compile_time_flag_is_confirmed_inline_on_fresh_process_pairs(ab_repo, monkeypatch, change, ret, outcome):
    # Measured: from a fresh clone, the main command failed on TF XLA compile time 4.86 s against the latest
    # baseline run's 3.04 s, the same code, while the machine ran its cases 1.3-1.8x slower.
    root = ab_repo.path
    run = [*RUN[:RUN.index("torch:fp32-sdpa")], "torch:fp32-sdpa-compiledefault",
           *RUN[RUN.index("torch:fp32-sdpa") + 1:], "--perf-baselines-dir", str(root / "bl")]
    monkeypatch.setenv("FAKE_COMPILE_S", "0.4")
    assert ab_repo.runpytest_subprocess(*run, "--perf-update-baselines").ret == 0
    baseline_commit = _git(root, "rev-parse", "HEAD").strip()
    if change == "code":
        (root / "pipelines" / "torch_diffusers.py").write_text(AB_BUILDER.format(tag="head", scale=1.0)
                                                               + "\nCOMPILE_FACTOR = 2.0\n")
        _git(root, "commit", "-qam", "compiles longer")
    else:
        monkeypatch.setenv("FAKE_AB_TEST_PROCESS_COMPILE", "2.0")
    result = ab_repo.runpytest_subprocess(*run, "--benchmark-json", "run.json")
    assert result.ret == ret, result.stdout.str()
    extra = _bench_of(root / "run.json")["extra_info"]
    gate, conf = extra["gate"], extra["gate"]["confirmation"]
    assert conf["flags"] == {"compile time": outcome} and conf["outcome"] == outcome
    assert conf["base_commit"] == baseline_commit and conf["processes"] >= 3
    fresh = [b["compile"] for b in conf["blocks"][1:]]
    assert len(fresh) >= 2 and all(c["head"] and c["base"] for c in fresh)
    if change == "process":
        assert gate["compile_flag"] == "regressed" and gate["compile_verdict"] == "unchanged"
        assert "compile time flag not confirmed by interleaved A/B against baseline commit " \
               f"{baseline_commit[:12]} (machine drift, not failing)" in extra["gate_message"]
        assert all(0.75 < c["head"] / c["base"] < 1.25 for c in fresh)
    else:
        assert gate["compile_verdict"] == "regressed" and "compile_flag" not in gate
        result.stdout.fnmatch_lines(["*compile time flag confirmed by interleaved A/B against baseline commit "
                                     f"{baseline_commit[:12]}*"])
        assert all(c["head"] / c["base"] > 1.5 for c in fresh)
    assert _worktrees(root) == [f"worktree {root}"]


@pytest.mark.parametrize("edit, message", [
    ({"commit": {"id": "0" * 40}}, "*flag stands, not confirmable: the A/B failed:*"),
    ({"versions": {"torch": "0.0.1-older"}}, "*flag stands, not confirmable: the stack differs from the baseline's "
                                              "(torch 0.0.1-older -> *"),
    ({"commit": {}}, "*flag stands, not confirmable: the baseline records no commit*"),
])
def test_a_flag_that_ab_cannot_clear_stands_and_says_why(ab_repo, monkeypatch, edit, message):
    root = ab_repo.path
    base = ["--perf-baselines-dir", str(root / "bl")]
    assert ab_repo.runpytest_subprocess(*RUN, *base, "--perf-update-baselines").ret == 0
    (path,) = (root / "bl").glob("*.json")
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        for key, value in edit.items():
            entry[key] = (dict(entry.get(key) or {}) | value) if key == "versions" else value
    path.write_text(json.dumps(data))
    monkeypatch.setenv("FAKE_DURATION", "0.028")  # drift only: an A/B would clear it, were one possible
    result = ab_repo.runpytest_subprocess(*RUN, *base, "--benchmark-json", "run.json")
    assert result.ret == 1
    result.stdout.fnmatch_lines([message])
    gate = _bench_of(root / "run.json")["extra_info"]["gate"]
    assert gate["verdict"] == "regressed" and gate["confirmation"]["outcome"] == "not confirmable"
    assert _worktrees(root) == [f"worktree {root}"]


def test_confirm_reports_flags_the_run_confirmed_inline_without_measuring_them_again():
    from types import SimpleNamespace

    from diffperf import ab_confirm

    conf = {"outcome": "machine drift", "verdict": "unchanged", "ratio": 1.01, "ci": [0.99, 1.03], "pairs": 20}
    run = SimpleNamespace(benchmarks={
        "t::drift": {"extra_info": {"gate": {"verdict": "unchanged", "flag": "regressed", "baseline_commit": "c1",
                                             "ratio": 1.3, "confirmation": conf}}},
        "t::confirmed": {"extra_info": {"gate": {"verdict": "regressed", "baseline_commit": "c1", "ratio": 1.5,
                                                 "confirmation": conf | {"outcome": "confirmed", "verdict": "regressed"}}}},
        "t::off": {"extra_info": {"gate": {"verdict": "regressed", "baseline_commit": "c2", "ratio": 1.4}}},
        "t::fine": {"extra_info": {"gate": {"verdict": "unchanged", "baseline_commit": "c1"}}},
    })
    flags = {f["test"]: f for f in ab_confirm.gate_flags(run)}
    assert set(flags) == {"t::drift", "t::confirmed", "t::off"}
    assert flags["t::drift"]["inline"]["outcome"] == "machine drift" and flags["t::off"]["inline"] is None
    rows = {r["test"]: r["outcome"] for r in ab_confirm.conclude(list(flags.values()), {})}
    assert rows == {"t::drift": "machine drift (in the run)", "t::confirmed": "confirmed (in the run)",
                    "t::off": "not confirmed: A/B failed (no result)"}
    text = ab_confirm.render(ab_confirm.conclude(list(flags.values()), {}), [])
    assert "3 gate flag(s): 1 confirmed by A/B, 1 machine drift, 1 not confirmed" in text


def test_stack_changes_name_each_package_whose_version_differs():
    from diffperf.ab_confirm import stack_changes

    now = {"torch": "2.13.0", "diffusers": "0.39.0", "pytest-benchmark": "5.3.1"}
    assert stack_changes({"torch": "2.12.0", "diffusers": "0.39.0", "pytest-benchmark": "5.0"}, now) == [
        "torch 2.12.0 -> 2.13.0"]
    assert stack_changes(None, now) == [] and stack_changes({"jax": "0.9"}, now) == []


def _bench_of(path: Path) -> dict:
    (bench,) = json.loads(path.read_text())["benchmarks"]
    return bench


def test_nightly_confirms_gate_flags_by_ab():
    from tests.test_workflows import load, steps

    job = load("nightly.yml")["jobs"]["benchmarks"]
    checkout = next(s for s in steps(job) if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    confirm = next(s for s in steps(job) if s.get("id") == "confirm")
    assert "python -m diffperf confirm nightly/run.json" in confirm["run"] and "$GITHUB_STEP_SUMMARY" in confirm["run"]
    fail = steps(job)[-1]
    assert "CONFIRM_STATUS" in fail["env"] and 'if [ "$CONFIRM_STATUS" = "1" ]' in fail["run"]


def test_launcher_pins_both_sides_of_a_case_to_its_workers_gpu(ab_repo):
    out = subprocess.run([sys.executable, "-m", "diffperf", "launch", "--devices", "3,5", "--isolate", "case",
                          "--json", "merged.json", "--", *RUN, "--perf-recipes", "torch:fp32-sdpa,torch:fp32-classic",
                          "--perf-ab-base", "HEAD~1"], cwd=ab_repo.path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    benches = json.loads((ab_repo.path / "merged.json").read_text())["benchmarks"]
    pins = [(b["extra_info"]["ab"]["head"]["cuda_visible_devices"], b["extra_info"]["ab"]["base"]["cuda_visible_devices"])
            for b in benches]
    assert len(pins) == 2 and all(h == b for h, b in pins) and {h for h, _ in pins} == {"3", "5"}
    assert all(b["extra_info"]["ab"]["verdict"] == "improved" for b in benches)
    assert _worktrees(ab_repo.path) == [f"worktree {ab_repo.path}"]


def test_judge_compares_memory_and_compile_as_single_values_of_the_same_kind():
    cmp = ab.paired_compare(*_pairs(1.0, 20, 0.01, 1), tolerance=0.05, alpha=0.01)
    side = {"peak_memory_bytes": {"steady": 100 << 20}, "memory_kind": "peak_rss", "compile_s": 10.0,
            "compile_kind": "cold-start-excess"}
    out = ab.judge("t", side | {"compile_s": 14.0}, side, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                   compile_pairs=[{"head": 14.0, "base": 10.0, "kind_head": "cold-start-excess",
                                   "kind_base": "cold-start-excess"}] * 2)
    assert out.failed and out.info == {"memory_verdict": "unchanged", "compile_verdict": "regressed"}
    assert "t: A/B compile time regressed" in out.message
    # The two figures are named by their side (there is no baseline in an A/B).
    alone = ab.judge("t", side | {"compile_s": 14.0}, side, cmp, memory_tolerance=0.1, compile_tolerance=0.25)
    assert "compile time (head vs base) inconclusive: base 10 s, head 14 s, ratio 1.400" in alone.message
    gpu = dict(side, memory_kind="cuda_allocator_peak")  # a reset allocator peak: judged on one pair
    out = ab.judge("t", gpu | {"peak_memory_bytes": {"steady": 120 << 20}, "compile_kind": "ahead-of-time"}, gpu,
                   cmp, memory_tolerance=0.1, compile_tolerance=0.25)
    assert out.failed and out.info == {"memory_verdict": "regressed", "compile_verdict": "not compared"}
    assert "peak memory (head vs base) regressed: base 100.0 MiB, head 120.0 MiB" in out.message
    out = ab.judge("t", side | {"memory_kind": "cuda_allocator"}, side, cmp, memory_tolerance=0.1,
                   compile_tolerance=0.25)
    assert not out.failed and out.info["memory_verdict"] == "not compared" and "A/B unchanged" in out.message


def test_memory_across_process_pairs_ignores_the_first_pairs_unlike_processes_but_catches_a_real_growth():
    # Measured A/A (TF XLA tiny, same tree): 203 MiB in the test process, 171 MiB in the base worker, a
    # "regression" of 18.6 % on the first pair alone. Fresh worker pairs are started alike and agree.
    cmp = ab.paired_compare(*_pairs(1.0, 20, 0.01, 1), tolerance=0.1, alpha=0.01)
    head = {"peak_memory_bytes": {"steady": 203 << 20}, "memory_kind": "peak_rss"}
    base = {"peak_memory_bytes": {"steady": 171 << 20}, "memory_kind": "peak_rss"}
    alone = ab.judge("t", head, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25)
    assert not alone.failed and alone.info["memory_verdict"] == "inconclusive"  # see the test after next
    alike = [{"head": 172 << 20, "base": 170 << 20, "kind_head": "peak_rss", "kind_base": "peak_rss"},
             {"head": 168 << 20, "base": 174 << 20, "kind_head": "peak_rss", "kind_base": "peak_rss"}]
    out = ab.judge("t", head, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25, memory_pairs=alike)
    assert not out.failed and out.info["memory_verdict"] == "unchanged"
    assert "across 2 fresh process pair(s)" in out.message
    grown = [{"head": 230 << 20, "base": 170 << 20, "kind_head": "peak_rss", "kind_base": "peak_rss"},
             {"head": 236 << 20, "base": 174 << 20, "kind_head": "peak_rss", "kind_base": "peak_rss"}]
    out = ab.judge("t", head, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25, memory_pairs=grown)
    assert out.failed and out.info["memory_verdict"] == "regressed" and "A/B peak memory regressed" in out.message
    one_accident = [grown[0], alike[1]]  # beyond the tolerance in one pair only: not a growth of the code
    assert ab.judge("t", head, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                    memory_pairs=one_accident).info["memory_verdict"] == "unchanged"
    mixed = [alike[0] | {"kind_head": "cuda_allocator"}]
    assert ab.judge("t", head, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                    memory_pairs=mixed).info["memory_verdict"] == "not compared"
    # Compile seconds the same way. Measured A/A, TF XLA tiny: 5.39 s in the test process, 4.12 s in the base worker.
    slow = {"compile_s": 5.39, "compile_kind": "cold-start-excess"}
    fast = {"compile_s": 4.12, "compile_kind": "cold-start-excess"}
    k = {"kind_head": "cold-start-excess", "kind_base": "cold-start-excess"}
    assert ab.judge("t", slow, fast, cmp, memory_tolerance=0.1, compile_tolerance=0.25).info["compile_verdict"] == "inconclusive"
    out = ab.judge("t", slow, fast, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                   compile_pairs=[{"head": 4.3, "base": 4.2} | k])
    assert not out.failed and out.info["compile_verdict"] == "unchanged" and "compile time (head vs base) unchanged across 1" in out.message
    out = ab.judge("t", slow, fast, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                   compile_pairs=[{"head": 6.3, "base": 4.2} | k, {"head": 6.1, "base": 4.4} | k])
    assert out.failed and out.info["compile_verdict"] == "regressed"


def test_first_pair_peak_memory_of_a_frameworks_first_pipeline_and_a_later_one_is_not_compared():
    # Measured, A/A runs of the default CPU matrix: tiny fp32 classic grew 34-53 MiB in the test process (after
    # the harness-accuracy test's torch pipeline) and 92-93 MiB in the base worker (its first torch pipeline);
    # the single-value rule called that "improved" in every run that settled the case on the first pair.
    cmp = ab.paired_compare(*_pairs(1.0, 20, 0.01, 1), tolerance=0.1, alpha=0.01)
    head = {"peak_memory_bytes": {"steady": 47 << 20}, "memory_kind": "peak_rss_growth", "first_in_process": False}
    base = {"peak_memory_bytes": {"steady": 93 << 20}, "memory_kind": "peak_rss_growth", "first_in_process": True}
    out = ab.judge("t", head, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25)
    assert out.info["memory_verdict"] == "not compared" and not out.failed
    assert ("peak memory: head after another pipeline of its framework in its process, base as the first"
            in out.message)
    assert ab.first_pipeline_differs(head["first_in_process"], base["first_in_process"])
    assert not ab.first_pipeline_differs(head["first_in_process"], head["first_in_process"])
    # A base tree that predates the field reports nothing: compared as before (on one pair, not called).
    assert ab.judge("t", head, base | {"first_in_process": None}, cmp, memory_tolerance=0.1,
                    compile_tolerance=0.25).info["memory_verdict"] == "inconclusive"
    # A growth in a like context is compared, and fresh pairs decide when they ran.
    grown = head | {"peak_memory_bytes": {"steady": 120 << 20}, "first_in_process": True}
    assert ab.judge("t", grown, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                    memory_pairs=[{"head": 120 << 20, "base": 93 << 20, "kind_head": "peak_rss_growth",
                                   "kind_base": "peak_rss_growth"}] * 2).failed
    alike = [{"head": 92 << 20, "base": 93 << 20, "kind_head": "peak_rss_growth", "kind_base": "peak_rss_growth"}]
    assert ab.judge("t", head, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                    memory_pairs=alike).info["memory_verdict"] == "unchanged"


def test_the_first_pairs_memory_and_compile_figures_alone_are_not_called_a_change():
    # Measured, one tree, `-k "latency and (tf-cpu or jax-cpu)" --perf-ab-processes 1`: TF XLA tiny's first pair
    # 270.9 vs 171.6 MiB (ratio 1.579) and compile 11.5 vs 7.69 s, both "regressed" and the run failed, with no
    # change between the sides. The first pair's two processes ran different cases before it.
    cmp = ab.paired_compare(*_pairs(1.0, 20, 0.01, 1), tolerance=0.1, alpha=0.01)
    head = {"peak_memory_bytes": {"steady": 270.9 * 2 ** 20}, "memory_kind": "peak_rss_growth",
            "first_in_process": False, "compile_s": 11.5, "compile_kind": "cold-start-excess"}
    base = {"peak_memory_bytes": {"steady": 171.6 * 2 ** 20}, "memory_kind": "peak_rss_growth",
            "first_in_process": False, "compile_s": 7.69, "compile_kind": "cold-start-excess"}
    note = "baselines/x.json holds 20 A/A first pairs of this case, 0 of them after the builds this run made"
    out = ab.judge("t", head, base, cmp, memory_tolerance=0.1, compile_tolerance=0.25, offset_note=note)
    assert not out.failed and out.info == {"memory_verdict": "inconclusive", "compile_verdict": "inconclusive"}
    assert out.message.startswith("t: A/B unchanged")
    assert ("peak memory (head vs base) inconclusive: base 171.6 MiB, head 270.9 MiB, ratio 1.579 (tolerance 10%, "
            "single value: no statistical test); beyond the tolerance on the first process pair alone") in out.message
    assert "compile time (head vs base) inconclusive: base 7.69 s, head 11.5 s, ratio 1.495" in out.message
    assert f"stored A/A first pairs of this selection ({note})" in out.message
    # Within the tolerance it is still "unchanged"; JAX's unresettable peak is judged the same way as host memory.
    same = ab.judge("t", head, head, cmp, memory_tolerance=0.1, compile_tolerance=0.25)
    assert same.info == {"memory_verdict": "unchanged", "compile_verdict": "unchanged"}
    jax = {"memory_kind": "jax-peak"}
    assert ab.judge("t", head | jax, base | jax, cmp, memory_tolerance=0.1,
                    compile_tolerance=0.25).info["memory_verdict"] == "inconclusive"


def test_a_single_value_change_in_one_fresh_pair_takes_another_before_it_fails():
    # Measured A/A (the default CPU matrix, same tree): one fresh pair alone called JAX jit compile time
    # (1.81 vs 1.45 s) and JAX AOT peak memory (164 vs 147 MiB) "regressed", and failed the run.
    from types import SimpleNamespace

    from diffperf import ab_replicate

    cmp = ab.paired_compare(*_pairs(1.0, 20, 0.01, 1), tolerance=0.1, alpha=0.01)
    k = {"kind_head": "cold-start-excess", "kind_base": "cold-start-excess"}
    side = {"compile_s": 1.8, "compile_kind": "cold-start-excess"}
    one = ab.judge("t", side, side, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                   compile_pairs=[{"head": 1.82, "base": 1.45} | k])  # ratio 1.255
    assert not one.failed and one.info["compile_verdict"] == "inconclusive"
    assert "2 pairs needed to call it" in one.message

    beyond, within = {"head": 1.82, "base": 1.45} | k, {"head": 1.50, "base": 1.45} | k
    tol = {"memory": 0.1, "compile": 0.25}

    def block(index, figure=None):
        head, base = _offset_pairs(1.0, 0.005, n=16)
        pc = ab.paired_compare(head, base, tolerance=0.1, alpha=0.01)
        return ab_replicate.Block(index, ab.PairsResult(head, base, ["HB"] * 16, pc, [], [], 1.0), 0, index, -index,
                                  compile=figure)

    pending = ab_replicate.single_values_pending
    assert pending({"compile": beyond}, [block(1)], tol)  # the first pair's unlike processes: fresh pairs judge
    assert not pending({"compile": within}, [block(1)], tol)
    assert not pending({"compile": beyond | {"kind_head": "ahead-of-time"}}, [block(1)], tol)
    assert pending({}, [block(1), block(2, beyond)], tol)  # beyond in one fresh pair: one more
    assert not pending({}, [block(1), block(2, within)], tol)
    assert not pending({}, [block(1), block(2, beyond), block(3, beyond)], tol)  # two pairs: judged
    assert not pending({"compile": beyond}, [block(1)], {"memory": 0.1, "compile": None})

    # replicate: the first pair settles latency alone, but its compile figures take two fresh pairs.
    figures = iter([beyond, beyond])
    calls = []

    def fake_block(session, case, index, **kw):
        calls.append(index)
        return block(index, next(figures))

    prepared = SimpleNamespace(case=SimpleNamespace(device="cpu", id="c"), cold_peak_bytes=None)
    kw = dict(test_id="t", rounds=16, warmup_rounds=0, max_time_s=60, tolerance=0.1, alpha=0.01, inject_slowdown=0.0,
              process_cv=0.01)
    session = SimpleNamespace(settings=SimpleNamespace(processes=12))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ab_replicate, "measure_block", fake_block)
        blocks, got, _ = ab_replicate.replicate(session, prepared, block(1), **kw)
        assert calls == [] and got.processes == 1  # settled alone, nothing else asked
        blocks, got, _ = ab_replicate.replicate(session, prepared, block(1), **kw, first_figures={"compile": beyond},
                                                tolerances=tol)
        assert calls == [2, 3] and len(blocks) == 3 and got.verdict == "unchanged"
    out = ab.judge("t", side, side, cmp, memory_tolerance=0.1, compile_tolerance=0.25,
                   compile_pairs=[b.compile for b in blocks[1:]])
    assert out.failed and out.info["compile_verdict"] == "regressed"


def test_a_cases_further_process_pairs_stop_when_their_time_budget_is_spent(monkeypatch):
    # Measured with another job on the 2-core VM's cores: one fp32-classic confirmation took 8 process pairs,
    # each pair's rounds running to --perf-max-time (111-165 s) plus 24-50 s of builds.
    from types import SimpleNamespace

    from diffperf import ab_replicate

    now = [0.0]
    ratios = iter([1.12, 0.90, 1.10, 0.92, 1.11, 0.91])  # processes that disagree: never decided
    given = []

    def block(index, ratio):
        head, base = _offset_pairs(ratio, 0.005, n=16)
        pc = ab.paired_compare(head, base, tolerance=0.03, alpha=0.01)
        return ab_replicate.Block(index, ab.PairsResult(head, base, ["HB"] * 16, pc, [], [], 1.0), 0, index, -index)

    def fake_block(session, case, index, **kw):
        given.append(kw["max_time_s"])
        now[0] += 150.0  # a busy machine: build 30 s, rounds to the limit
        return block(index, next(ratios))

    monkeypatch.setattr(ab_replicate, "measure_block", fake_block)
    prepared = SimpleNamespace(case=SimpleNamespace(device="cpu", id="c"), cold_peak_bytes=None)
    kw = dict(test_id="t", rounds=16, warmup_rounds=0, max_time_s=120.0, tolerance=0.03, alpha=0.01,
              inject_slowdown=0.0, process_cv=0.01)
    session = SimpleNamespace(settings=SimpleNamespace(processes=12, case_time_s=400.0))
    blocks, got, stopped = ab_replicate.replicate(session, prepared, block(1, 1.0), **kw, clock=lambda: now[0])
    # Pairs start at 0, 150 and 300 s; the third's rounds take at most the 100 s left; none starts at 450 s.
    assert len(blocks) == 4 and given == [120.0, 120.0, 100.0]
    assert got.verdict == "inconclusive" and got.processes == 4
    assert stopped == "stopped after 4 process pair(s): the further pairs took 450 s of --perf-ab-max-time 400 s"
    # The A/B message says why the verdict rests on fewer pairs.
    side = {"peak_memory_bytes": {"steady": 1}, "memory_kind": "peak_rss_growth"}
    assert stopped in ab.judge("t", side, side, got, 0.1, 0.25, stopped=stopped).message.splitlines()[2]


def _calibration_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ab_calibration", REPO / "benchmarks" / "ab_calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_calibration_report_is_continued_only_while_the_measured_code_and_options_are_unchanged(tmp_path):
    cal = _calibration_module()
    repo = tmp_path / "repo"
    for folder in cal.MEASURED:
        (repo / folder).mkdir(parents=True)
        (repo / folder / "x.py").write_text(f"# {folder}\n")
    (repo / "README.md").write_text("v1\n")
    _git(tmp_path, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "A")
    commit_a = _git(repo, "rev-parse", "HEAD").strip()
    options = {"slowdown": 0.06, "tolerance": "0.03", "recipes": "torch:fp32-classic", "extra": ""}
    out = tmp_path / "report.json"
    out.write_text(json.dumps({"commit_a": commit_a, "commit_b": "b" * 40, "slowdown": 0.06, "tolerance": "0.03",
                               "recipes": "torch:fp32-classic", "runs": [{"condition": "A/A", "index": 0}]}))
    (repo / "README.md").write_text("v2\n")  # a later commit that leaves the measured code alone
    _git(repo, "commit", "-qam", "docs")
    report = cal.resumable(out, options, repo)
    assert report["runs"] == [{"condition": "A/A", "index": 0}]
    assert report["measured_trees"] == cal.measured_trees(repo, commit_a)
    with pytest.raises(SystemExit, match=r"other options: tolerance '0.03' \(this call: '0.05'\)"):
        cal.resumable(out, dict(options, tolerance="0.05"), repo)
    (repo / "pipelines" / "x.py").write_text("# changed\n")
    _git(repo, "commit", "-qam", "builder changed")
    with pytest.raises(SystemExit, match=r"measured code changed since the report's commit A .* \(pipelines/\)"):
        cal.resumable(out, options, repo)
    with pytest.raises(SystemExit, match="no report at"):
        cal.resumable(tmp_path / "missing.json", options, repo)


def test_a_calibration_run_set_aside_is_counted_apart_with_its_reason():
    cal = _calibration_module()
    case = {"ab": "unchanged", "gate": "regressed"}
    report = {"runs": [{"condition": c, "index": i, "wall_s": 1.0, "cases": {"x": dict(case, ab=v)}}
                       for i, (c, v) in enumerate([("A/A", "unchanged"), ("A/A", "regressed"), ("A/B", "regressed")])]}
    cal.set_aside(report, cal.parse_set_aside(["2=my analysis shared the cores"]))
    assert [r.get("set_aside") for r in report["runs"]] == [None, "my analysis shared the cores", None]
    text = cal.table(report)
    rows = [line.split() for line in text.splitlines()]
    # verdicts, regressed, unchanged: the A/A run measured alone, then the set-aside one, counted apart
    assert ["A/A", "interleaved", "A/B", "1", "0", "1"] in [r[:6] for r in rows]
    assert ["A/A", "(set", "aside)", "interleaved", "A/B", "1", "1", "0"] in [r[:8] for r in rows]
    assert "run 2 set aside: my analysis shared the cores" in text
    with pytest.raises(SystemExit, match="the report holds no run 9"):
        cal.set_aside(report, {8: "no such run"})
    for bad in ("2", "x=why", "0=why", "3="):
        with pytest.raises(SystemExit, match="expected RUN=REASON"):
            cal.parse_set_aside([bad])
