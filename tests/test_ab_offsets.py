"""A/A first-pair offsets stored with the baselines (diffperf/ab_offsets.py): the prior, the one-pair settle, the fold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffperf import ab, ab_offsets, ab_replicate
from diffperf.baselines import BaselineError, BaselineStore, baseline_path
from diffperf.baselines import main as baseline_main
from tests.test_gate import HW, lognormal, record

TEST_ID = "perf/test_pipelines.py::test_latency[torch-cpu-tiny-fp32-sdpa-bs1-4steps]"


def _first_pair(ratio: float, tolerance: float = 0.10, n: int = 20, noise: float = 0.02, seed: int = 1):
    """The first pair's own comparison: head = ``ratio`` x base, ``noise`` a round, on a drifting machine."""
    rng = np.random.default_rng(seed)
    base = 0.1 * (1 + 0.3 * np.linspace(0, 1, n) ** 2) * np.exp(rng.normal(0, noise, n))
    head = base * ratio * np.exp(rng.normal(0, noise, n))
    return ab.paired_compare(list(head), list(base), tolerance=tolerance, alpha=0.01)


def _observations(log_ratios, pairs_se=0.01):
    return [{"log_ratio": m, "pairs_se": pairs_se, "pairs": 16, "commit": "c" * 40,
             "recorded_at": f"2026-11-30T0{i}:00:00"} for i, m in enumerate(log_ratios)]


def test_the_prior_is_the_a_a_spread_about_zero_net_of_the_pairs_own_error_and_floored():
    entry = {ab_offsets.KEY: _observations([0.02, -0.02, 0.02, -0.02, 0.02])}
    got = ab_offsets.prior(entry, "baselines/x.json")
    assert got.sd == pytest.approx(math.sqrt(0.02 ** 2 - 0.01 ** 2)) and got.observations == got.df == 5
    assert got.source == "baselines/x.json: 5 A/A first pairs"
    # A mean offset (the test process slower on average) counts as spread, not as a correction.
    assert ab_offsets.prior({ab_offsets.KEY: _observations([0.03] * 5, 0.0)}).sd == pytest.approx(0.03)
    # Offsets within the pairs' own error: the floor, never zero.
    assert ab_offsets.prior({ab_offsets.KEY: _observations([0.005, -0.004, 0.0, 0.003, -0.006], 0.02)}).sd == \
        ab_offsets.FLOOR
    assert ab_offsets.prior({ab_offsets.KEY: _observations([0.0] * 4)}) is None  # too few to replace the guess
    assert ab_offsets.prior(None) is None and ab_offsets.prior({}) is None


def test_a_first_pair_within_its_cases_measured_offsets_settles_alone_where_the_guessed_offset_would_not():
    first = _first_pair(1.03)
    assert first.verdict in ("unchanged", "inconclusive") and first.pairs_se < 0.01
    # The guess (3 x the 1 % --perf-ab-process-cv) leaves room for a 10 % change behind a 3 % ratio.
    assert ab_replicate.settles_alone(first) is None
    tight = ab_offsets.prior({ab_offsets.KEY: _observations([0.01, -0.012, 0.008, 0.015, -0.01, 0.011], 0.004)},
                             "baselines/cpu-x.json")
    settled = ab_replicate.settles_alone(first, tight)
    assert settled is not None and settled.verdict == "unchanged" and settled.processes == 1 and settled.decided
    assert settled.process_cv == tight.sd and settled.min_detectable <= 0.10 and settled.ci_low < 1.03 < settled.ci_high
    assert (f"allows the {tight.sd:.1%} first-pair offset measured in baselines/cpu-x.json: 6 A/A first pairs"
            in settled.describe())
    # A case whose processes disagree (fp32-classic measured sd 2.7-4.2 %) takes further pairs at that ratio.
    wide = ab_offsets.prior({ab_offsets.KEY: _observations([0.04, -0.045, 0.05, -0.04, 0.045, -0.05], 0.004)})
    assert ab_replicate.settles_alone(first, wide) is None
    # A change is never called on one pair, whatever the offsets.
    assert ab_replicate.settles_alone(_first_pair(1.15), tight) is None
    # Nor is a 3 % tolerance settled where the offsets are as large as the tolerance.
    assert ab_replicate.settles_alone(_first_pair(1.0, tolerance=0.03), wide) is None


def test_five_agreeing_a_a_runs_widen_the_interval_more_than_twenty():
    first = _first_pair(1.02, noise=0.04)
    few = ab_offsets.prior({ab_offsets.KEY: _observations([0.015, -0.015] * 2 + [0.015], 0.0)})
    many = ab_offsets.prior({ab_offsets.KEY: _observations([0.015, -0.015] * 10, 0.0)})
    assert few.sd == pytest.approx(many.sd)
    v5, lo5, hi5, mds5, se5 = ab_offsets.judge_first_pair(first, few)
    v20, lo20, hi20, mds20, se20 = ab_offsets.judge_first_pair(first, many)
    assert se5 == pytest.approx(se20) and hi5 - lo5 > hi20 - lo20 and mds5 > mds20


# ------------------------------------------------------------------------------------------ the fold


DEFAULT_BEFORE = ("torch-cpu-tiny-fp32-classic-bs1-4steps",)  # what the test process built before TEST_ID


def _aa_record(ratio: float, pairs_se: float = 0.02, *, head: str = "a" * 40, base: str | None = None,
               dirty: bool = False, base_python: str = "/py", inject: float = 0.0, blocks_only: bool = False,
               ran_before=DEFAULT_BEFORE) -> dict:
    ab_rec = {"verdict": "unchanged", "ratio": ratio, "head_commit": {"id": head, "dirty": dirty},
              "base_commit": {"id": base or head, "rev": "HEAD", "dirty": False},
              "head": {"python": "/py", **({} if ran_before is None else {"ran_before": list(ran_before)})},
              "base": {"python": base_python}, "inject_slowdown": inject,
              "blocks": [{"index": 1, "ratio": ratio, "pairs_se": pairs_se, "pairs": 16},
                         {"index": 2, "ratio": 0.99, "pairs_se": 0.02, "pairs": 12}]}
    if not blocks_only:
        ab_rec["first_pair"] = {"ratio": ratio, "pairs_se": pairs_se, "pairs": 16}
    return record(lognormal(10)) | {"hardware_id": HW, "ab": ab_rec}


def _saved(tmp_path, name: str, when: str, benches: list[tuple[str, dict]]):
    data = {"machine_info": {}, "commit_info": {"id": "a" * 40}, "datetime": when,
            "benchmarks": [{"fullname": t, "name": t, "stats": {"median": 0.1}, "extra_info": rec} for t, rec in benches]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def baselines(tmp_path):
    out = tmp_path / "baselines"
    store = BaselineStore.load(baseline_path(out, HW))
    store.append(TEST_ID, record(lognormal(10)), commit={"id": "a" * 40})
    store.save()
    return out


def test_saved_a_a_runs_fold_into_each_entry_oldest_first_once_each(tmp_path, baselines):
    runs = [_saved(tmp_path, f"000{i}_aa.json", f"2026-11-30T1{i}:00:00", [(TEST_ID, _aa_record(r, blocks_only=i == 1))])
            for i, r in enumerate([1.02, 0.99, 1.01])]
    assert ab_offsets.fold(list(reversed(runs)), baselines) == [baseline_path(baselines, HW)]
    held = BaselineStore.load(baseline_path(baselines, HW)).get(TEST_ID)[ab_offsets.KEY]
    assert [round(math.exp(o["log_ratio"]), 3) for o in held] == [1.02, 0.99, 1.01]  # by the runs' datetime
    assert held[1]["pairs_se"] == 0.02 and held[0]["pairs"] == 16 and held[0]["commit"] == "a" * 40
    ab_offsets.fold(runs[:1], baselines)  # a run folded again is not a new observation
    assert len(BaselineStore.load(baseline_path(baselines, HW)).get(TEST_ID)[ab_offsets.KEY]) == 3
    more = [_saved(tmp_path, f"01{i}_aa.json", f"2026-12-01T{i:02d}:00:00", [(TEST_ID, _aa_record(1.0))])
            for i in range(6)]
    assert baseline_main(["offsets", *map(str, more), "--baselines-dir", str(baselines), "--keep", "5"]) == 0
    held = BaselineStore.load(baseline_path(baselines, HW)).get(TEST_ID)[ab_offsets.KEY]
    assert len(held) == 5 and all(o["recorded_at"].startswith("2026-12-01") for o in held)
    # A/A runs of another selection (other builds before the case) are kept beside them, not in their place.
    other = [_saved(tmp_path, f"02{i}_aa.json", f"2026-12-02T{i:02d}:00:00", [(TEST_ID, _aa_record(1.0, ran_before=()))])
             for i in range(6)]
    assert baseline_main(["offsets", *map(str, other), "--baselines-dir", str(baselines), "--keep", "5"]) == 0
    held = BaselineStore.load(baseline_path(baselines, HW)).get(TEST_ID)[ab_offsets.KEY]
    assert [o["recorded_at"][:13] for o in held] == ([f"2026-12-01T{i:02d}" for i in range(1, 6)]
                                                     + [f"2026-12-02T{i:02d}" for i in range(1, 6)])
    assert ab_offsets.prior(BaselineStore.load(baseline_path(baselines, HW)).get(TEST_ID),
                            ran_before=DEFAULT_BEFORE).observations == 5
    with pytest.raises(SystemExit):  # fewer than MIN_OBSERVATIONS kept would never be used
        baseline_main(["offsets", str(more[0]), "--baselines-dir", str(baselines), "--keep", "3"])


@pytest.mark.parametrize("kwargs, why", [
    ({"base": "b" * 40}, "is not an A/A measurement: its base commit bbbbbbbbbbbb is not its head commit aaaaaaaaaaaa"),
    ({"dirty": True}, "its head checkout had uncommitted changes"),
    ({"base_python": "/other/py"}, "its base side ran another interpreter (--perf-ab-python)"),
    ({"inject": 0.06}, "its head was slowed on purpose (--perf-inject-slowdown 0.06)"),
    ({"ran_before": None}, "it does not record what the test process built before the case"),
])
def test_a_run_that_is_not_a_a_is_named_and_nothing_is_written(tmp_path, baselines, capsys, kwargs, why):
    good = _saved(tmp_path, "0001_aa.json", "2026-11-30T10:00:00", [(TEST_ID, _aa_record(1.01))])
    bad = _saved(tmp_path, "0002_ab.json", "2026-11-30T11:00:00", [(TEST_ID, _aa_record(1.06, **kwargs))])
    before = baseline_path(baselines, HW).read_text()
    assert baseline_main(["offsets", str(good), str(bad), "--baselines-dir", str(baselines)]) == 2
    err = capsys.readouterr().err
    assert "0002_ab.json" in err and TEST_ID in err and why in err
    assert baseline_path(baselines, HW).read_text() == before


def test_a_run_without_an_entry_or_without_a_b_is_named(tmp_path, baselines):
    other = "perf/test_pipelines.py::test_latency[torch-cpu-tiny-fp32-classic-bs1-4steps]"
    run = _saved(tmp_path, "0001_aa.json", "2026-11-30T10:00:00", [(other, _aa_record(1.0))])
    with pytest.raises(ab_offsets.OffsetsError, match=r"classic.*has no entry in .*fold plain runs of it first"):
        ab_offsets.fold([run], baselines)
    plain = _saved(tmp_path, "0002_plain.json", "2026-11-30T10:00:00", [(TEST_ID, record(lognormal(10)) | {"hardware_id": HW})])
    with pytest.raises(ab_offsets.OffsetsError, match=r"0002_plain.json: no A/B record \(run it with --perf-ab-base HEAD\)"):
        ab_offsets.fold([plain], baselines)


def test_a_latency_refresh_keeps_the_offsets_and_a_bad_offset_names_the_entry(tmp_path, baselines):
    path = baseline_path(baselines, HW)
    store = BaselineStore.load(path)
    store.put(dict(store.get(TEST_ID), **{ab_offsets.KEY: _observations([0.01] * 5)}))
    store.save()
    store = BaselineStore.load(path)
    store.append(TEST_ID, record(lognormal(10, 1.1)), commit={"id": "d" * 40})  # --perf-update-baselines
    store.save()
    entry = BaselineStore.load(path).get(TEST_ID)
    assert len(entry["history"]) == 2 and len(entry[ab_offsets.KEY]) == 5
    data = json.loads(path.read_text())
    data["entries"][TEST_ID][ab_offsets.KEY][2]["log_ratio"] = "fast"
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match=r"entry '.*sdpa.*': ab_offsets\[2\]: 'log_ratio' must be a finite number"):
        BaselineStore.load(path)


def test_with_stored_offsets_the_first_pair_stops_taking_rounds_once_it_settles():
    # 10 pairs of 5.6 % noise a round: their own error (2.5-2.6 %) is above the quarter tolerance a process pair
    # aims for, so without offsets the pair takes more rounds; a case whose A/A first pairs agree settles here.
    first = _first_pair(1.0, n=10, noise=0.056, seed=7)
    assert 0.025 < first.pairs_se < 0.026 and not ab_replicate.pair_done(first)
    tight = ab_offsets.prior({ab_offsets.KEY: _observations([0.004, -0.004] * 10, 0.0)})  # 20 A/A runs
    assert not ab_replicate.first_pair_done(first) and ab_replicate.first_pair_done(first, tight)
    # Six runs that agree as well are not trusted as far: that pair takes more rounds.
    assert not ab_replicate.first_pair_done(first, ab_offsets.prior({ab_offsets.KEY: _observations([0.004, -0.004] * 3, 0.0)}))
    # A case whose first pairs disagree by 6 % (TF graph mode measured one at 1.16) cannot settle, and takes the
    # rounds any pair takes: its error is part of the verdict across process pairs.
    loose = _first_pair(1.0, n=10, noise=0.12, seed=7)
    assert loose.pairs_se > 0.04 and not ab_replicate.pair_done(loose)
    wide = ab_offsets.prior({ab_offsets.KEY: _observations([0.06, -0.06] * 3, 0.0)})
    assert ab_replicate.settles_alone(loose, wide) is None and not ab_replicate.first_pair_done(loose, wide)
    assert not ab_replicate.first_pair_done(first, ab_offsets.prior({ab_offsets.KEY: _observations([0.02, -0.02] * 3, 0.0)}))


def test_a_first_pair_that_could_still_settle_takes_rounds_down_to_the_error_where_it_would():
    # Seven A/A runs at the floor: a ratio of 1 settles once the pairs' own error is under about 2.4 %, just
    # below the quarter-tolerance target (2.5 %) a pair would stop at; a jit-like 2 % offset needs 1.4 %.
    seven = ab_offsets.prior({ab_offsets.KEY: _observations([0.004, -0.004, 0.003, -0.003, 0.002, -0.002, 0.0], 0.0)})
    reach = ab_offsets.settle_se(0.10, 0.01, seven)
    assert 0.02 < reach < 0.025
    jit = ab_offsets.prior({ab_offsets.KEY: _observations([0.02, -0.02, 0.02, -0.02, 0.02, -0.02, 0.02], 0.0)})
    assert 0.0125 < ab_offsets.settle_se(0.10, 0.01, jit) < reach
    assert ab_offsets.settle_se(0.10, 0.01, ab_offsets.prior({ab_offsets.KEY: _observations([0.07, -0.07] * 4, 0.0)})) == 0
    from dataclasses import replace

    at = _first_pair(1.0, n=20, noise=0.04, seed=3)
    between = replace(at, pairs_se=(reach + 0.025) / 2, ratio=1.02)  # done by the quarter rule, not settled
    assert ab_replicate.pair_done(between) and ab_replicate.settles_alone(between, seven) is None
    assert not ab_replicate.first_pair_done(between, seven)  # more rounds: it may still settle alone
    assert ab_replicate.first_pair_done(replace(between, ratio=1.07), seven)  # beyond half the tolerance: no
    assert ab_replicate.settles_alone(replace(between, pairs_se=reach * 0.98), seven) is not None


def test_the_run_finds_a_cases_offsets_through_the_gates_baseline_file(tmp_path, baselines):
    from diffperf.gate import Gate, GateSettings

    gate = Gate(GateSettings(baselines_dir=baselines))
    before = list(DEFAULT_BEFORE)
    assert ab_offsets.lookup(gate, TEST_ID, HW, before) == (None, None)  # no A/A runs: the guess, nothing to say
    store = BaselineStore.load(baseline_path(baselines, HW))
    store.put(dict(store.get(TEST_ID), **{ab_offsets.KEY: [dict(o, ran_before=before)
                                                           for o in _observations([0.01, -0.01] * 3)]}))
    store.save()
    got, note = ab_offsets.lookup(Gate(GateSettings(baselines_dir=baselines)), TEST_ID, HW, before)
    assert got.observations == 6 and got.source == f"baselines/{HW}.json: 6 A/A first pairs" and note is None
    assert ab_offsets.lookup(None, TEST_ID, HW, before) == (None, None)
    (tmp_path / "broken").mkdir()
    baseline_path(tmp_path / "broken", HW).write_text("{")
    assert ab_offsets.lookup(Gate(GateSettings(baselines_dir=tmp_path / "broken")), TEST_ID, HW, before) == (None, None)


def test_stored_offsets_count_only_for_a_run_whose_test_process_built_the_same_cases_before(baselines):
    # Measured, one tree: TF XLA tiny's first-pair memory ratio 1.06-1.18 in A/A runs of the default CPU matrix
    # (torch cases, then TF graph, before it) and 1.255-1.579 in A/A runs of `-k "latency and (tf-cpu or jax-cpu)"`
    # (TF graph only): judged against the matrix's range, 3 of 7 of those were called "regressed".
    from diffperf.gate import Gate, GateSettings

    matrix = ["torch-cpu-tiny-fp32-classic-bs1-4steps", "tf-cpu-tiny-fp32-bs1-4steps"]
    selection = ["tf-cpu-tiny-fp32-bs1-4steps"]
    obs = ([dict(o, ran_before=matrix, memory_ratio=r) for o, r in
            zip(_observations([0.01, -0.01, 0.012, -0.008, 0.01]), [1.059, 1.127, 1.160, 1.163, 1.180])]
           + [dict(o, ran_before=selection, memory_ratio=r) for o, r in
              zip(_observations([0.04, 0.05, 0.03, 0.045]), [1.255, 1.287, 1.331, 1.579])])
    entry = {ab_offsets.KEY: obs}
    mine = ab_offsets.prior(entry, "b", matrix)
    assert mine.observations == 5 and mine.memory_range == (1.059, 1.180)
    assert ab_offsets.prior(entry, "b", selection) is None  # 4 runs of the selection: too few, and not the matrix's
    assert ab_offsets.prior(entry, "b", matrix[::-1]) is None  # another order is another state
    assert ab_offsets.prior(entry).observations == 9  # all of them, where no run's state is asked
    # Through the run's lookup: the record says why its stored A/A runs did not count.
    store = BaselineStore.load(baseline_path(baselines, HW))
    store.put(dict(store.get(TEST_ID), **entry))
    store.save()
    got, note = ab_offsets.lookup(Gate(GateSettings(baselines_dir=baselines)), TEST_ID, HW, selection)
    assert got is None
    assert note == (f"baselines/{HW}.json holds 9 A/A first pairs of this case, 4 of them after the builds this run "
                    f"made before it: tf-cpu-tiny-fp32-bs1-4steps; 5 are needed: fold A/A runs of this selection with "
                    f"python -m diffperf baseline offsets")
    # Stored observations must name their builds as case ids.
    with pytest.raises(ab_offsets.OffsetsError, match=r"ab_offsets\[0\]: 'ran_before' must be a list of case ids"):
        ab_offsets.validate([dict(obs[0], ran_before="torch")], "entry x")


# ------------------------------------------------------------------- the first pair's memory ratio

MIB = 2 ** 20


def _with_memory(rec: dict, head_mib: float, base_mib: float, *, kinds=("peak_rss_growth", "peak_rss_growth"),
                 first=(False, False)) -> dict:
    rec["ab"]["head"].update(peak_memory_bytes={"steady": head_mib * MIB}, memory_kind=kinds[0], first_in_process=first[0])
    rec["ab"]["base"].update(peak_memory_bytes={"steady": base_mib * MIB}, memory_kind=kinds[1], first_in_process=first[1])
    return rec


def test_the_fold_keeps_the_first_pairs_memory_ratio_and_five_of_them_give_its_range(tmp_path, baselines):
    # Measured (TF XLA tiny, 5 A/A runs of the default CPU matrix): head / base 1.059-1.180.
    heads = [448.0, 455.5, 408.8, 435.0, 449.0]
    runs = [_saved(tmp_path, f"000{i}_aa.json", f"2026-11-30T1{i}:00:00",
                   [(TEST_ID, _with_memory(_aa_record(1.0), h, 386.0))]) for i, h in enumerate(heads)]
    # Figures that do not compare are not kept: unlike kinds, or one side its framework's first pipeline.
    runs.append(_saved(tmp_path, "0005_aa.json", "2026-11-30T16:00:00",
                       [(TEST_ID, _with_memory(_aa_record(1.0), 900.0, 386.0, kinds=("peak_rss_growth", "device")))]))
    runs.append(_saved(tmp_path, "0006_aa.json", "2026-11-30T17:00:00",
                       [(TEST_ID, _with_memory(_aa_record(1.0), 40.0, 92.0, first=(False, True)))]))
    runs.append(_saved(tmp_path, "0007_aa.json", "2026-11-30T18:00:00", [(TEST_ID, _aa_record(1.0))]))  # no figures
    ab_offsets.fold(runs, baselines)
    entry = BaselineStore.load(baseline_path(baselines, HW)).get(TEST_ID)
    assert all(o["ran_before"] == list(DEFAULT_BEFORE) for o in entry[ab_offsets.KEY])  # each keeps its state
    kept = [o.get("memory_ratio") for o in entry[ab_offsets.KEY]]
    assert kept[:5] == [pytest.approx(h / 386.0, rel=1e-5) for h in heads] and kept[5:] == [None, None, None]
    got = ab_offsets.prior(entry)
    assert got.memory_range == pytest.approx((408.8 / 386.0, 455.5 / 386.0), rel=1e-5) and got.memory_observations == 5
    assert got.as_dict()["memory_range"] == list(got.memory_range)
    # Fewer than five memory ratios: none is claimed (the latency spread still is).
    four = ab_offsets.prior({ab_offsets.KEY: [dict(o, memory_ratio=1.1) for o in _observations([0.0] * 4)]
                             + _observations([0.0] * 3)})
    assert four.observations == 7 and four.memory_range is None and four.memory_observations == 0
    data = json.loads(baseline_path(baselines, HW).read_text())
    data["entries"][TEST_ID][ab_offsets.KEY][0]["memory_ratio"] = -1
    baseline_path(baselines, HW).write_text(json.dumps(data))
    with pytest.raises(BaselineError, match=r"ab_offsets\[0\]: 'memory_ratio' must be a number > 0 when given"):
        BaselineStore.load(baseline_path(baselines, HW))


def test_the_first_pairs_memory_is_judged_against_its_a_a_range_not_against_one():
    # The test process's TF XLA figure ran 6-18 % above the base worker's in every A/A run: against 1, the first
    # pair's memory asked for a fresh process pair in most A/B runs, and failed a test settled on one pair.
    ratios = [1.059, 1.127, 1.160, 1.163, 1.180]
    offset = ab_offsets.prior({ab_offsets.KEY: [dict(o, memory_ratio=r) for o, r in zip(_observations([0.0] * 5), ratios)]})
    assert offset.memory_range == (1.059, 1.180)
    first = {"head": 1.14 * 386 * MIB, "base": 386 * MIB, "kind_head": "peak_rss_growth", "kind_base": "peak_rss_growth"}
    tolerances = {"memory": 0.10, "compile": None}
    assert ab_replicate.single_values_pending({"memory": first}, [], tolerances)  # against 1: a fresh pair
    aa_low = offset.memory_range[0]
    assert not ab_replicate.single_values_pending({"memory": dict(first, aa_low=aa_low)}, [], tolerances)
    # Beyond the lowest A/A ratio by more than the tolerance: a change of 10 % may hide there, so look again
    # (1.18 is the highest A/A ratio: one A/A run in five pays a fresh pair, as the rule must).
    assert ab_replicate.single_values_pending({"memory": dict(first, head=1.18 * 386 * MIB, aa_low=aa_low)}, [],
                                              tolerances)

    cmp = ab.paired_compare([0.1] * 12, [0.1] * 12, tolerance=0.10, alpha=0.01)

    def side(ratio):
        return {"peak_memory_bytes": {"steady": ratio * 386 * MIB}, "memory_kind": "peak_rss_growth",
                "first_in_process": False}

    def verdict(ratio, **kw):
        return ab.judge("t", side(ratio), side(1.0), cmp, 0.10, 0.25, **kw)

    assert not verdict(1.14).failed and verdict(1.14).info["memory_verdict"] == "inconclusive"  # not on one pair
    scaled = verdict(1.14, memory_offset=offset)
    assert not scaled.failed and scaled.info["memory_verdict"] == "unchanged"
    assert "ratio 1.140 against 1.059-1.180 in 5 stored A/A first pairs: no growth beyond the tolerance" in scaled.message
    assert verdict(1.20, memory_offset=offset).info["memory_verdict"] == "inconclusive"  # not ruled out, not shown
    assert verdict(1.32, memory_offset=offset).info["memory_verdict"] == "regressed"  # beyond the highest by 12 %
    # Measured A/A first pairs reached 0.83 (fp32 SDPA) below a stored 0.91-0.99: one pair calls no improvement.
    low = verdict(0.83, memory_offset=offset)
    assert low.info["memory_verdict"] == "unchanged" and "not called an improvement on one process pair" in low.message
    # Further pairs (two workers, alike) are judged as they were: the A/A range is the first pair's only.
    pairs = [{"head": 390 * MIB, "base": 386 * MIB, "kind_head": "peak_rss_growth", "kind_base": "peak_rss_growth"}] * 2
    across = verdict(1.14, memory_pairs=pairs, memory_offset=offset)
    assert across.info["memory_verdict"] == "unchanged" and "stored A/A" not in across.message
