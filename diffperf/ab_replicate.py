"""A/B across process pairs: each further pair a fresh head process and a fresh base process, judged together.

``--perf-ab-processes N`` (default :data:`DEFAULT_PROCESSES`) measures a case in up to ``N`` process pairs.
The first pair is the test process and the long-lived base worker (:func:`diffperf.ab.pair_up`); each
further pair is a new head worker (this tree, this interpreter) and a new base worker (the base tree, by
``--perf-ab-python`` when given), each building the case, warmed, measured in interleaved pairs exactly as
the first, then closed. Pairs are added until the verdict across them is decided ("unchanged" from
:data:`MIN_PROCESSES` pairs, "regressed" or "improved" from :data:`MIN_PROCESSES_CHANGE`), or ``N`` ran.

Note: two processes built from one tree run at speeds of their own, fixed for the process' life (measured
on the 2-core CI VM with ``benchmarks/ab_calibration.py``: one pair of fp32 classic-attention processes
differs by up to 5 %, with a standard deviation of 2.7 %; fp32 SDPA by 0.5 %). Interleaved pairs cancel
the machine's drift but not that offset, so one process pair cannot tell a 5 % regression from it at any
number of rounds. Each process pair's median log-ratio is one observation of "change + offset"; their
mean is tested with a moderated t (Smyth 2004, the ``limma`` estimator): the between-pair variance is
pooled with a prior of :data:`PRIOR_DF` degrees of freedom at ``--perf-ab-process-cv`` plus the pairs' own
error, so two pairs that happen to agree are not trusted as if the offset were known to be zero, and a case
whose processes disagree gets a wide interval and more pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import time
from typing import Callable, Sequence

import numpy as np

from diffperf import ab

DEFAULT_PROCESSES = 12  # at most; a case stops adding pairs once the verdict across them is decided
MIN_PROCESSES = 2  # fewer process pairs never decide: one pair's offset is indistinguishable from a change
MIN_PROCESSES_CHANGE = 3  # "regressed" / "improved" need one more: two pairs may share one slow process' offset
PRIOR_DF = 4  # weight of the --perf-ab-process-cv prior on the between-pair variance, in pairs' worth
# One pair settles "unchanged" alone when its interval, widened by an offset this many times --perf-ab-process-cv,
# lies inside the tolerance: measured offsets of one pair reached 5-6.5 % (fp32-classic, sd 2.7 %), so a
# change of the tolerance's size cannot hide behind one at 3x the default 1 %.
SETTLE_OFFSET_FACTOR = 3.0
# The two workers of a further pair import the case's stack and build its pipeline at once, then make their first
# calls (cold start, compile) one at a time, the head first in even pairs and the base first in odd ones. Measured
# on the 2-core VM: two workers building tiny fp32 classic and making its first call at once took 30.8 s, each
# first call 12.0 s (against 0.17 s alone: two processes' thread pools on two cores); one alone 6.8 s. So
# concurrent first calls cost a replicated case 30 s a pair and made the pairs' compile figures measure the
# contention. A build is mostly one thread (Keras traces its functional models in Python: TF tiny 7.3-8.3 s at once
# or alone), so two at once cost little more than one: measured, two workers of one tree building TF tiny graph
# (imports included), 27.4-27.7 s one at a time, 18.6-20.6 s at once; their first calls alike either way (TF graph
# 2.4-2.9 s; XLA, built next, 7.1-7.9 s; torch classic 0.14-0.24 s).
# Process pairs 2 .. 1 + POOL_PAIRS are kept for the next case (their pipelines released), so a run pays each
# worker's start and imports once; further pairs are started for one case and closed. Measured on the 2-core
# VM: a further pair's start, imports and build took 8-24 s a case, the build alone 0.2-9 s.
POOL_PAIRS = 2
# Fresh process pairs a peak-memory or compile-time difference beyond its tolerance must show in before it is
# "regressed": one pair's figures are one draw each (measured, A/A: JAX jit compile 1.81 vs 1.45 s, JAX AOT
# peak 164 vs 147 MiB in one pair), so a figure beyond its tolerance in the first fresh pair takes another.
MIN_FRESH_SINGLE = 2


@dataclasses.dataclass
class Block:
    """One process pair's measurement of a case."""

    index: int  # 1: the test process and the base worker; 2...: fresh worker pairs
    pairs: ab.PairsResult
    seed: int
    head_pid: int | None
    base_pid: int | None
    head_builder_file: str | None = None
    base_builder_file: str | None = None
    memory: dict | None = None  # steady peak of each worker: {"head", "base", "kind_head", "kind_base"}
    compile: dict | None = None  # compile seconds of each worker, the same way (each built alone: alike)

    def as_dict(self) -> dict:
        cmp = self.pairs.comparison
        return {"index": self.index, "ratio": cmp.ratio, "ci": [cmp.ci_low, cmp.ci_high], "pairs": cmp.pairs,
                "pairs_se": cmp.pairs_se, "verdict": cmp.verdict, "order": self.pairs.order, "order_seed": self.seed,
                "head_samples_s": self.pairs.head, "base_samples_s": self.pairs.base,
                "seconds": self.pairs.seconds, "head_pid": self.head_pid, "base_pid": self.base_pid,
                "head_builder_file": self.head_builder_file, "base_builder_file": self.base_builder_file,
                "memory": self.memory, "compile": self.compile}


def combine(blocks: Sequence[ab.PairedComparison], *, tolerance: float, alpha: float, process_cv: float,
            power: float = 0.8) -> ab.PairedComparison:
    """The verdict across process pairs, from each pair's median log-ratio (moderated t, see the module note).

    Effect: the mean of the pairs' log-ratios, as a ratio. Variance: ``(PRIOR_DF * s0^2 + SS) / df`` with
    ``s0^2 = process_cv^2 + mean(pairs_se^2)``, ``SS`` the pairs' sum of squares about their mean and
    ``df = PRIOR_DF + k - 1``; interval and one-sided p from Student's t on ``df``. The verdict rule is
    :func:`diffperf.ab.decide`'s, "unchanged" from :data:`MIN_PROCESSES` pairs on, "regressed" and "improved"
    from :data:`MIN_PROCESSES_CHANGE` on: a verdict that fails the test (or claims a gain) is made on three
    pairs of processes, so two that happen to share a slow head process and a fast base cannot make it.
    """
    from scipy.stats import t

    if not blocks:
        raise ValueError("no process pairs to combine")
    m = np.log([b.ratio for b in blocks])
    k = m.size
    within = [b.pairs_se ** 2 for b in blocks if math.isfinite(b.pairs_se)]
    s0_sq = process_cv ** 2 + (float(np.mean(within)) if within else 0.0)
    mu = float(np.mean(m))
    ss = float(np.sum((m - mu) ** 2))
    df = PRIOR_DF + k - 1
    se = max(math.sqrt((PRIOR_DF * s0_sq + ss) / df / k), 1e-12)
    confidence = 1 - alpha if alpha < 0.5 else 0.95
    half = float(t.ppf(1 - (1 - confidence) / 2, df)) * se
    p_slow, p_fast = float(t.sf(mu / se, df)), float(t.cdf(mu / se, df))
    mds = math.expm1((float(t.ppf(1 - alpha, df)) + float(t.ppf(power, df))) * se)
    pairs = sum(b.pairs for b in blocks)
    ratio, lo, hi = math.exp(mu), math.exp(mu - half), math.exp(mu + half)
    enough = k >= MIN_PROCESSES and pairs >= ab.MIN_PAIRS
    verdict = ab.decide(ratio, lo, hi, p_slow, p_fast, mds, tolerance, alpha, enough)
    if k < MIN_PROCESSES or (k < MIN_PROCESSES_CHANGE and verdict in ("regressed", "improved")):
        verdict = "inconclusive"
    return ab.PairedComparison(verdict, ratio, lo, hi, confidence, p_slow, p_fast, pairs, mds, tolerance, alpha,
                               process_cv, se, processes=k, replicated=True,
                               block_ratios=tuple(float(b.ratio) for b in blocks))


def pair_done(cmp: ab.PairedComparison) -> bool:
    """When one process pair of a replicated A/B has enough rounds: its own standard error is within the
    between-process offset it will be pooled with (``--perf-ab-process-cv``) or a quarter of the tolerance,
    whichever is larger, so more rounds in this pair would buy less than another pair of processes; a
    change beyond doubt stops it too.

    Note: with rounds of about 0.1 s on the 2-core VM, one pair's log-ratio has a standard deviation of
    about 10 %: a 1 % error takes 70-250 pairs (20-65 s), and a further process pair costs about 15 s
    to start, import and build. At a 10 % tolerance, 2.5 % is as useful and four times cheaper."""
    enough = max(cmp.process_cv, cmp.tolerance / 4, 1e-3)
    return cmp.verdict in ("regressed", "improved") or (cmp.pairs >= 2 and cmp.pairs_se <= enough)


# With stored A/A offsets the first pair takes rounds down to the error at which it would settle, when its
# ratio is within half the tolerance and that error is no smaller than this fraction of the tolerance (at most
# about four times the rounds of the quarter-tolerance target): rounds are cheaper than another process pair
# (measured, default CPU matrix: a pair's rounds 1-20 s, a further pair's start, build and rounds 5-60 s).
SETTLE_SE_FLOOR = 1 / 8


def first_pair_done(cmp: ab.PairedComparison, offset=None) -> bool:
    """When the first process pair has enough rounds: :func:`pair_done`; with the case's stored A/A ``offset``,
    as soon as it settles alone (:func:`settles_alone`), or once its own error is down to where it would
    settle (:func:`diffperf.ab_offsets.settle_se`) when its ratio is within half the tolerance and that error
    is at least :data:`SETTLE_SE_FLOOR` of the tolerance.

    Note: a first pair that cannot settle still takes the rounds :func:`pair_done` asks for, even when its
    stored offsets are wide (TF graph mode here: 7 %): its error enters the prior of the verdict across pairs
    (:func:`combine`), and a first pair stopped at 10 pairs (5 % error) made that verdict take a third
    process pair (measured, two A/A runs of the default CPU matrix)."""
    from diffperf.ab_offsets import settle_se

    if offset is None:
        return pair_done(cmp)
    if cmp.verdict in ("regressed", "improved") or settles_alone(cmp, offset) is not None:
        return True
    enough = max(cmp.process_cv, cmp.tolerance / 4, 1e-3)
    reach = settle_se(cmp.tolerance, cmp.alpha, offset)
    if abs(math.log(cmp.ratio)) <= math.log1p(cmp.tolerance / 2) and reach >= cmp.tolerance * SETTLE_SE_FLOOR:
        enough = min(enough, reach)
    return cmp.pairs >= 2 and cmp.pairs_se <= enough


def settles_alone(cmp: ab.PairedComparison, offset=None) -> ab.PairedComparison | None:
    """The first pair's "unchanged", when it holds with the case's first-pair offset added to its error; else
    ``None`` (more pairs are needed). A change, or anything undecided, is never settled by one pair.

    The offset: ``offset`` (a :class:`diffperf.ab_offsets.OffsetPrior`, the spread measured in the case's stored
    A/A runs), judged by :func:`diffperf.ab_offsets.judge_first_pair` with the verdict rule of every A/B; without
    one, :data:`SETTLE_OFFSET_FACTOR` times ``--perf-ab-process-cv`` (sd), and the interval must lie inside the
    tolerance."""
    from diffperf import stats

    if cmp.pairs < ab.MIN_PAIRS or not math.isfinite(cmp.pairs_se) or cmp.verdict not in ("unchanged", "inconclusive"):
        return None
    if offset is not None:
        from diffperf.ab_offsets import judge_first_pair

        verdict, lo, hi, mds, _se = judge_first_pair(cmp, offset)
        if verdict != "unchanged":
            return None
        return dataclasses.replace(cmp, verdict="unchanged", ci_low=lo, ci_high=hi, min_detectable=mds,
                                   process_cv=offset.sd, processes=1, replicated=True, block_ratios=(cmp.ratio,),
                                   offset_source=offset.source)
    wide = SETTLE_OFFSET_FACTOR * cmp.process_cv
    half = stats._z(1 - (1 - cmp.confidence) / 2) * math.hypot(cmp.pairs_se, wide)
    m = math.log(cmp.ratio)
    lo, hi = math.exp(m - half), math.exp(m + half)
    if not (lo > 1 - cmp.tolerance and hi < 1 + cmp.tolerance):
        return None
    return dataclasses.replace(cmp, verdict="unchanged", ci_low=lo, ci_high=hi, process_cv=wide, processes=1,
                               replicated=True, block_ratios=(cmp.ratio,))


def measure_block(session: ab.AbSession, case, index: int, *, test_id: str, rounds: int, warmup_rounds: int,
                  max_time_s: float, tolerance: float, alpha: float, inject_slowdown: float,
                  process_cv: float) -> Block:
    """Process pair ``index`` (>= 2): a head worker and a base worker build ``case``, are warmed and measured in
    interleaved pairs; then their pipelines are released, and the pair is kept for the next case when it is one
    of the first :data:`POOL_PAIRS` further pairs, else closed. The two workers of a pair have run the same
    cases before, so their memory and compile figures compare. Raises :class:`diffperf.ab.AbError` (or
    ``AbDoesNotFit``); a pair that raised is closed, and the next case starts a fresh one."""
    head, base = _pair(session, index)
    ok = False
    try:
        timeout = session.build_timeout_s
        with ab._progress(f"A/B {case.id}: build in the head and base workers of process pair {index}"):
            for worker in (head, base):  # built at once; first calls one at a time (module note)
                worker.start_held_build(case, **({"slowdown": inject_slowdown}
                                                 if inject_slowdown and worker is head else {}))
            for worker in (head, base):
                _named(worker, case, functools.partial(worker.await_built, timeout))
            built = {}
            for worker in ((head, base) if index % 2 == 0 else (base, head)):
                built[worker.side] = _named(worker, case, functools.partial(worker.first_call, timeout))

        def head_round() -> float:
            return float(head.request("round")["seconds"])

        def base_round() -> float:
            return float(base.request("round")["seconds"])

        seed = ab.order_seed(session.settings.seed, f"{test_id}#pair{index}")
        head_warm, base_warm = [], []
        for _ in range(warmup_rounds):
            head_warm.append(head_round())
            base_warm.append(base_round())
        for worker in (head, base):
            worker.request("reset_memory")
        with ab._progress(f"{case.id}: A/B pairs in process pair {index}"):
            res = ab.run_pairs(head_round, base_round, min_pairs=rounds, warmup_rounds=0,
                               max_time_s=max_time_s, tolerance=tolerance, alpha=alpha, seed=seed,
                               compare=functools.partial(ab.paired_compare, process_cv=process_cv), done=pair_done)
        res.head_warm, res.base_warm = head_warm, base_warm
        got = {w.side: w.request("stats") for w in (head, base)}
        memory = {"head": got["head"].get("steady_peak_bytes"), "base": got["base"].get("steady_peak_bytes"),
                  "kind_head": got["head"].get("memory_kind"), "kind_base": got["base"].get("memory_kind")}
        (h_s, h_kind), (b_s, b_kind) = (ab._compile_figure(got[side], built[side].get("cold_start_s"), rounds_)
                                        for side, rounds_ in (("head", res.head), ("base", res.base)))
        compile_ = {"head": h_s, "base": b_s, "kind_head": h_kind, "kind_base": b_kind} if h_s or b_s else None
        block = Block(index, res, seed, head.proc.pid, base.proc.pid, built["head"].get("builder_file"),
                      built["base"].get("builder_file"), memory, compile_)
        ok = index - 1 <= POOL_PAIRS and _release_all((head, base))
        return block
    finally:
        if not ok:
            session.pool.pop(index, None)
            _close_all((head, base))
            for worker in (head, base):
                if worker in session.replicas:
                    session.replicas.remove(worker)


def _pair(session: ab.AbSession, index: int) -> tuple[ab.BaseWorker, ab.BaseWorker]:
    """Process pair ``index``'s head and base workers: the pooled ones when both are alive, else new ones."""
    pooled = session.pool.get(index)
    if pooled and all(w.proc.poll() is None and not w.busy for w in pooled):
        return pooled
    if pooled:
        session.pool.pop(index)
        _close_all(pooled)
        session.replicas[:] = [w for w in session.replicas if w not in pooled]
    scratch = session.scratch / f"pair{index}"
    (head, _), (base, _) = session.spawn_many([("head", scratch / "head"), ("base", scratch / "base")])
    session.replicas += [head, base]
    if index - 1 <= POOL_PAIRS:
        session.pool[index] = (head, base)
    return head, base


def _release_all(workers: Sequence[ab.BaseWorker]) -> bool:
    """Ask every worker to release its pipeline, at once; whether all did."""
    try:
        for worker in workers:
            worker.send("release")
        for worker in workers:
            worker.receive("release", 60)
    except ab.AbWorkerError:
        return False
    return True


def _named(worker: ab.BaseWorker, case, step) -> dict:
    """``step()`` of ``worker``'s build of ``case``; a failure is named (:func:`diffperf.ab.build_error`)."""
    try:
        return step()
    except ab.AbWorkerError as exc:
        raise ab.build_error(exc, case, worker.side, worker.python, "next to the test process' pipeline") from None


def _close_all(workers: Sequence[ab.BaseWorker]) -> None:
    """Ask every idle worker to exit at once, then close each (a busy or stuck one is killed)."""
    asked = []
    for worker in workers:
        if worker.proc.poll() is None and not worker.busy:
            try:
                worker.send("close")
                asked.append(worker)
            except ab.AbWorkerError:
                pass
    for worker in asked:
        try:
            worker.receive("close", 30)
            worker.proc.wait(timeout=10)
        except (ab.AbWorkerError, OSError, subprocess.TimeoutExpired):
            pass
    for worker in workers:
        worker.close()


def single_values_pending(first: dict, blocks: Sequence[Block], tolerances: dict) -> bool:
    """Whether a peak-memory or compile-time figure beyond its tolerance (``tolerances``: ``{"memory": ...,
    "compile": ...}``) has fewer than :data:`MIN_FRESH_SINGLE` fresh pairs to be judged on: in a fresh pair,
    or, before any, in ``first`` (the first pair's figures, whose two processes are unlike)."""
    for key, tol in tolerances.items():
        if tol is None:
            continue
        figures = [getattr(b, key) for b in blocks[1:] if getattr(b, key)]
        if len(figures) >= MIN_FRESH_SINGLE:
            continue
        if any(_beyond(f, tol) for f in figures or [first.get(key)]):
            return True
    return False


def _beyond(figure: dict | None, tol: float) -> bool:
    """Whether the head's figure exceeds the base's by more than ``tol``; a first pair's memory figure carries
    ``aa_low``, the lowest ratio of the case's stored A/A first pairs (:mod:`diffperf.ab_offsets`), which the
    base's figure is scaled by."""
    if not figure or not figure.get("head") or not figure.get("base"):
        return False
    base = figure["base"] * (figure.get("aa_low") or 1.0)
    return figure.get("kind_head") == figure.get("kind_base") and figure["head"] / base > 1 + tol


def replicate(session: ab.AbSession, prepared, first: Block, *, test_id: str, rounds: int, warmup_rounds: int,
              max_time_s: float, tolerance: float, alpha: float, inject_slowdown: float, process_cv: float,
              min_processes: int = 0, first_figures: dict | None = None, tolerances: dict | None = None,
              offset=None,
              clock: Callable[[], float] = time.monotonic) -> tuple[list[Block], ab.PairedComparison, str | None]:
    """Add process pairs to ``first`` while the verdict across them is undecided, up to ``--perf-ab-processes``;
    none when the first pair alone rules out a change of the tolerance's size (:func:`settles_alone`, with the
    case's stored A/A ``offset`` when it has one) and
    nothing else asks for more: ``min_processes`` (the confirmation of a peak-memory or compile-time flag), or
    a peak-memory or compile-time figure beyond its tolerance (:func:`single_values_pending`; those figures
    are compared on the fresh pairs only).

    Returns the blocks, the combined comparison and why replication stopped early (``None`` when it did not):
    a further pair that does not fit on the device beside the test process' pipeline ends it, and so does the
    case's time budget (``--perf-ab-max-time``: no further pair starts once the further pairs have taken it, and
    a pair's rounds take at most what is left of it); the verdict rests on the pairs that ran (inconclusive when
    undecided or fewer than :data:`MIN_PROCESSES`).

    Note: the budget bounds what a noisy or busy machine can cost. Measured on the 2-core VM with another job on
    its cores: the confirmation of one fp32-classic flag took 8 process pairs whose rounds each ran to
    ``--perf-max-time`` (111-165 s) plus 24-50 s of builds, and the run was still going after 25 minutes.
    """
    blocks = [first]
    most = session.settings.processes
    budget = getattr(session.settings, "case_time_s", None)
    started = clock()
    least = min(max(MIN_PROCESSES, min_processes), most)

    def pending() -> bool:
        return single_values_pending(first_figures or {}, blocks, tolerances or {})

    settled = settles_alone(first.pairs.comparison, offset)
    if settled is not None and min_processes <= 1 and not pending():
        return blocks, settled, None
    cmp = combine([first.pairs.comparison], tolerance=tolerance, alpha=alpha, process_cv=process_cv)
    stopped = None
    while len(blocks) < most and (len(blocks) < least or not cmp.decided or pending()):
        spent = clock() - started
        if budget is not None and spent >= budget:
            stopped = (f"stopped after {len(blocks)} process pair(s): the further pairs took {spent:.0f} s of "
                       f"--perf-ab-max-time {budget:g} s")
            break
        left = max_time_s if budget is None else min(max_time_s, budget - spent)
        try:
            ab.check_fits(prepared.case, 2 * prepared.cold_peak_bytes if prepared.cold_peak_bytes else None)
            blocks.append(measure_block(session, prepared.case, len(blocks) + 1, test_id=test_id, rounds=rounds,
                                        warmup_rounds=warmup_rounds, max_time_s=left, tolerance=tolerance,
                                        alpha=alpha, inject_slowdown=inject_slowdown, process_cv=process_cv))
        except ab.AbDoesNotFit as exc:
            stopped = f"stopped after {len(blocks)} process pair(s): {exc}"
            break
        cmp = combine([b.pairs.comparison for b in blocks], tolerance=tolerance, alpha=alpha, process_cv=process_cv)
    return blocks, cmp, stopped
