"""A/A offsets of the first process pair, stored with the baselines: what lets one process pair settle a case.

The first process pair of an A/B is the test process and the base worker (:func:`diffperf.ab.pair_up`).
Two processes of one tree run at speeds of their own, so the first pair's ratio is "change + offset"
(:mod:`diffperf.ab_replicate`). Without knowing how large that offset gets for a case, one pair settles
"unchanged" only inside ``SETTLE_OFFSET_FACTOR`` times ``--perf-ab-process-cv``, and most cases take a
second pair of fresh processes. This module measures the offset instead: every saved A/A run (``--perf-ab-base
HEAD`` on a clean checkout, one interpreter, nothing injected) holds one first-pair ratio per case, and
``python -m diffperf baseline offsets RUN...`` folds them into each baseline entry's ``ab_offsets`` (the
last :data:`KEEP`). From :data:`MIN_OBSERVATIONS` of them on, an A/B run judges its first pair with the case's
own offset spread (:func:`prior`, :func:`diffperf.ab_replicate.settles_alone`).

Note: the spread is the root mean square of the A/A log-ratios about zero, less their own pairs' error
(method of moments; at least :data:`FLOOR`): a first pair that is slower on average (the test process ran
other cases before) counts as spread, not as a correction. A new first pair's ratio under no change then has
the variance "offset spread + its own pairs' error", estimated from the stored runs alone, so its quantiles
are Student's t on as many degrees of freedom as there are stored runs: five runs that happen to agree widen
the interval more than twenty, and an estimate at the floor is not trusted beyond what its runs showed.

The offsets describe the test process as the A/A run left it before the case: what it had built before
(``ran_before``, the case ids in order, :attr:`diffperf.harness.Prepared.ran_before`). Each observation keeps
that list, and a run uses only the observations whose list is its own (:func:`prior`): measured, TF XLA's
first-pair memory ratio was 1.06-1.18 in 5 A/A runs of the default CPU matrix and 1.255-1.579 in 7 of
``-k "latency and (tf-cpu or jax-cpu)" --perf-ab-processes 1``, called "regressed" in 3 of them against the
default matrix's range. A selection without its own A/A runs keeps the ``--perf-ab-process-cv`` guess, and
its first pair's memory and compile figures are not judged alone (:func:`diffperf.ab.judge`).

The same A/A runs hold the first pair's peak-memory ratio (test process / base worker), which is not 1 either:
measured in 5 A/A runs of the default CPU matrix, TF XLA tiny 1.06-1.18, JAX jit 1.06-1.11 (outside pytest
two plain processes differ by 1-3 %; pytest's own process, its plugins off, grows about 30 MiB more on TF XLA).
Their range (:attr:`OffsetPrior.memory_range`, from :data:`MIN_OBSERVATIONS` on) is the first pair's memory
ratio under no change: the first pair's figure asks for a fresh process pair only when it exceeds even the
lowest A/A ratio by the tolerance, and judged alone it is "regressed" only beyond the highest, "unchanged"
within the tolerance of the lowest (:func:`diffperf.ab._first_pair_memory`); further pairs (two workers) are
judged as before.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

from diffperf.baselines import BaselineError

KEY = "ab_offsets"
KEEP = 20  # A/A observations kept per entry and builds before the case (ran_before), oldest dropped first
MIN_OBSERVATIONS = 5  # fewer say too little about a spread to replace the --perf-ab-process-cv guess
FLOOR = 0.005  # log-sd: the smallest offset spread claimed (measured worker-pair offsets of SDPA: 0.5 %)


class OffsetsError(BaselineError):
    """A saved run or a stored offset that cannot be folded or read (the message names it)."""


@dataclasses.dataclass(frozen=True)
class OffsetPrior:
    """A case's first-pair offset spread, from ``observations`` stored A/A runs."""

    sd: float  # log standard deviation of the first pair's offset, net of the pairs' own error
    observations: int
    source: str  # where it came from, for the record and the message
    memory_range: tuple[float, float] | None = None  # lowest and highest first-pair peak-memory ratio (head / base)
    memory_observations: int = 0  # how many of the stored runs hold one

    @property
    def df(self) -> int:
        return self.observations

    def as_dict(self) -> dict:
        return {"sd": self.sd, "observations": self.observations, "source": self.source,
                "memory_range": list(self.memory_range) if self.memory_range else None,
                "memory_observations": self.memory_observations}


def _finite(value: Any, low: float = -math.inf) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def validate(value: Any, where: str) -> None:
    """Raise :class:`OffsetsError` naming ``where`` when ``value`` is not a list of A/A observations."""
    if not isinstance(value, list):
        raise OffsetsError(f"{where}: {KEY!r} must be a list of A/A first-pair observations")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise OffsetsError(f"{where}: {KEY}[{i}] is a {type(item).__name__}, not an object")
        if not _finite(item.get("log_ratio")):
            raise OffsetsError(f"{where}: {KEY}[{i}]: 'log_ratio' must be a finite number")
        if not _finite(item.get("pairs_se"), 0.0):
            raise OffsetsError(f"{where}: {KEY}[{i}]: 'pairs_se' must be a finite number >= 0")
        pairs = item.get("pairs")
        if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 2:
            raise OffsetsError(f"{where}: {KEY}[{i}]: 'pairs' must be an integer >= 2")
        if item.get("memory_ratio") is not None and not (_finite(item["memory_ratio"]) and item["memory_ratio"] > 0):
            raise OffsetsError(f"{where}: {KEY}[{i}]: 'memory_ratio' must be a number > 0 when given")
        ran = item.get("ran_before")
        if ran is not None and not (isinstance(ran, list) and all(isinstance(c, str) for c in ran)):
            raise OffsetsError(f"{where}: {KEY}[{i}]: 'ran_before' must be a list of case ids when given")


def matching(entry: dict | None, ran_before: Sequence[str] | None) -> list[dict]:
    """``entry``'s stored A/A observations whose test process had built ``ran_before`` before the case (all of
    them when ``ran_before`` is ``None``; an observation that does not record it matches no list)."""
    obs = list((entry or {}).get(KEY) or [])
    if ran_before is None:
        return obs
    return [o for o in obs if o.get("ran_before") == list(ran_before)]


def prior(entry: dict | None, source: str = "baselines", ran_before: Sequence[str] | None = None) -> OffsetPrior | None:
    """The offset spread of ``entry``'s stored A/A first pairs made after the same builds as this run's
    (``ran_before``, :func:`matching`), or ``None`` with fewer than :data:`MIN_OBSERVATIONS` of them (the run
    then keeps the ``--perf-ab-process-cv`` guess)."""
    obs = matching(entry, ran_before)
    if len(obs) < MIN_OBSERVATIONS:
        return None
    var = sum(o["log_ratio"] ** 2 - o["pairs_se"] ** 2 for o in obs) / len(obs)
    sd = max(math.sqrt(max(var, 0.0)), FLOOR)
    memory = [o["memory_ratio"] for o in obs if o.get("memory_ratio") is not None]
    enough = len(memory) >= MIN_OBSERVATIONS
    return OffsetPrior(sd, len(obs), f"{source}: {len(obs)} A/A first pairs",
                       (min(memory), max(memory)) if enough else None, len(memory) if enough else 0)


def judge_first_pair(cmp, offset: OffsetPrior, power: float = 0.8):
    """``cmp`` (the first pair's own comparison) judged with the case's measured offset: the pairs' error and
    the offset spread added in quadrature, quantiles from Student's t on the stored runs' degrees of freedom
    (module note), the verdict by :func:`diffperf.ab.decide`. Returns ``(verdict, ci_low, ci_high,
    min_detectable, se)``."""
    from scipy.stats import t

    from diffperf import ab

    se = math.hypot(cmp.pairs_se, offset.sd)
    df = offset.df
    half = float(t.ppf(1 - (1 - cmp.confidence) / 2, df)) * se
    m = math.log(cmp.ratio)
    lo, hi = math.exp(m - half), math.exp(m + half)
    mds = math.expm1(_detect_factor(cmp.alpha, df, power) * se)
    verdict = ab.decide(cmp.ratio, lo, hi, cmp.p_slower, cmp.p_faster, mds, cmp.tolerance, cmp.alpha,
                        cmp.pairs >= ab.MIN_PAIRS)
    return verdict, lo, hi, mds, se


def _detect_factor(alpha: float, df: float, power: float) -> float:
    """Standard errors between no change and the change detected at ``alpha`` with ``power`` (Student's t)."""
    from scipy.stats import t

    return float(t.ppf(1 - alpha, df)) + float(t.ppf(power, df))


def settle_se(tolerance: float, alpha: float, offset: OffsetPrior, power: float = 0.8) -> float:
    """The pairs' own standard error at which a first pair with a ratio of 1 would settle "unchanged" by
    detecting the tolerance (:func:`judge_first_pair`'s ``min_detectable``); 0 when even error-free pairs
    would not (the offset alone is too wide)."""
    room = math.log1p(tolerance) / _detect_factor(alpha, offset.df, power)
    return math.sqrt(room ** 2 - offset.sd ** 2) if room > offset.sd else 0.0


def lookup(gate, test_id: str, hardware_id: str, ran_before: Sequence[str]) -> tuple[OffsetPrior | None, str | None]:
    """The offset prior of ``test_id`` in the gate's baseline file for ``hardware_id``, from the A/A runs whose
    test process had built ``ran_before`` before the case, and a note when the file holds A/A runs of the case
    but too few of them match (``(None, None)`` without a gate, a file or an entry; a file that does not load
    is the gate's to report)."""
    if gate is None:
        return None, None
    try:
        store = gate.store(hardware_id)
    except BaselineError:  # the gate names the file in the test's verdict
        return None, None
    entry = store.get(test_id)
    got = prior(entry, f"baselines/{store.path.name}", ran_before)
    held = len((entry or {}).get(KEY) or [])
    if got is not None or not held:
        return got, None
    same = len(matching(entry, ran_before))
    return None, (f"baselines/{store.path.name} holds {held} A/A first pairs of this case, {same} of them after the "
                  f"builds this run made before it: {', '.join(ran_before) or 'none'}; {MIN_OBSERVATIONS} are needed: "
                  "fold A/A runs of this selection with python -m diffperf baseline offsets")


# --------------------------------------------------------------------------------- saved A/A runs


def not_aa(ab: dict) -> str | None:
    """Why the A/B record ``ab`` (a benchmark's ``extra_info["ab"]``) is not an A/A measurement, or ``None``.

    A/A: the base is the head's own commit on a clean checkout, run by the same interpreter, with no
    injected slowdown and a first pair measured.
    """
    head, base = ab.get("head_commit") or {}, ab.get("base_commit") or {}
    if ab.get("verdict") == "error":
        return "its A/B failed"
    if not head.get("id") or head.get("id") != base.get("id"):
        return f"its base commit {str(base.get('id'))[:12]} is not its head commit {str(head.get('id'))[:12]}"
    if head.get("dirty"):
        return "its head checkout had uncommitted changes, so the base commit is another tree"
    if (ab.get("head") or {}).get("python") != (ab.get("base") or {}).get("python"):
        return "its base side ran another interpreter (--perf-ab-python)"
    if ab.get("inject_slowdown"):
        return f"its head was slowed on purpose (--perf-inject-slowdown {ab['inject_slowdown']})"
    if first_pair(ab) is None:
        return "it holds no first process pair"
    if not isinstance((ab.get("head") or {}).get("ran_before"), list):
        return ("it does not record what the test process built before the case (saved before diffperf recorded "
                "'ran_before'; run it again)")
    return None


def first_pair(ab: dict) -> dict | None:
    """``{"log_ratio", "pairs_se", "pairs"}`` of the record's first process pair (``ab["first_pair"]``, or the
    first of ``ab["blocks"]`` in runs saved before it was recorded), or ``None``."""
    got = ab.get("first_pair") or next((b for b in ab.get("blocks") or [] if b.get("index") == 1), None)
    if not got or not _finite(got.get("ratio"), 0.0) or got["ratio"] <= 0 or not _finite(got.get("pairs_se"), 0.0):
        return None
    return {"log_ratio": math.log(got["ratio"]), "pairs_se": float(got["pairs_se"]), "pairs": int(got["pairs"])}


def first_pair_memory(ab: dict) -> float | None:
    """The first pair's steady peak-memory ratio head / base in the A/B record ``ab``, or ``None`` when a side has
    no figure, the two were measured as different kinds, or one side built the case as its framework's first
    pipeline in its process and the other did not (those are not compared at all)."""
    from diffperf.ab import first_pipeline_differs

    head, base = ab.get("head") or {}, ab.get("base") or {}
    h, b = ((side.get("peak_memory_bytes") or {}).get("steady") for side in (head, base))
    if not (_finite(h) and _finite(b) and h > 0 and b > 0) or head.get("memory_kind") != base.get("memory_kind"):
        return None
    if first_pipeline_differs(head.get("first_in_process"), base.get("first_in_process")):
        return None
    return h / b


def _trimmed(obs: list[dict], ran_before: list[str], keep: int) -> list[dict]:
    """``obs`` less the oldest observations made after ``ran_before`` beyond the last ``keep`` of them (others
    untouched, the order kept)."""
    excess = sum(o.get("ran_before") == ran_before for o in obs) - keep
    out = []
    for o in obs:
        if excess > 0 and o.get("ran_before") == ran_before:
            excess -= 1
            continue
        out.append(o)
    return out


def fold(run_paths: Sequence[str | Path], baselines_dir: str | Path, keep: int = KEEP) -> list[Path]:
    """Append the first-pair log-ratio (and peak-memory ratio, :func:`first_pair_memory`) of every A/A record in
    the saved runs (oldest run first) to its baseline entry's ``ab_offsets`` (the last ``keep`` of each
    ``ran_before`` kept: A/A runs of one selection do not push out another's) and write
    the files.

    Every run and file is read and checked first; nothing is written when a run is not A/A (the reason is
    named), holds no A/B record, or a record's test id has no baseline entry (fold plain runs first). A run
    folded before is not counted twice.
    """
    from diffperf.baselines import BaselineStore, baseline_path, load_runs_oldest_first, round_sig, save_all

    if not isinstance(keep, int) or keep < MIN_OBSERVATIONS:
        raise OffsetsError(f"--keep {keep!r}: keep at least {MIN_OBSERVATIONS} A/A observations")
    stores: dict[str, BaselineStore] = {}
    for run in load_runs_oldest_first(run_paths, OffsetsError):
        found = 0
        for bench in run.data["benchmarks"]:
            rec = bench.get("extra_info") or {}
            ab = rec.get("ab")
            if not isinstance(ab, dict) or not rec.get("hardware_id"):
                continue
            why = not_aa(ab)
            if why:
                raise OffsetsError(f"saved run {run.path}: {bench['fullname']} is not an A/A measurement: {why}")
            hw = rec["hardware_id"]
            if hw not in stores:
                stores[hw] = BaselineStore.load(baseline_path(baselines_dir, hw))
            entry = stores[hw].get(bench["fullname"])
            if entry is None:
                raise OffsetsError(f"saved run {run.path}: {bench['fullname']} has no entry in "
                                   f"{stores[hw].path}; fold plain runs of it first (python -m diffperf "
                                   "baseline fold)")
            obs = first_pair(ab)
            item = {"log_ratio": round_sig(obs["log_ratio"]), "pairs_se": round_sig(obs["pairs_se"]),
                    "pairs": obs["pairs"], "ran_before": list(ab["head"]["ran_before"]),
                    "commit": (ab.get("head_commit") or {}).get("id"),
                    "recorded_at": str(run.data.get("datetime") or "") or None}
            memory = first_pair_memory(ab)
            if memory is not None:
                item["memory_ratio"] = round_sig(memory)
            found += 1
            held = list(entry.get(KEY) or [])
            if any(o.get("recorded_at") == item["recorded_at"] and o.get("log_ratio") == item["log_ratio"]
                   for o in held):
                continue  # this run was folded before: one run is one observation
            stores[hw].put(dict(entry, **{KEY: _trimmed(held + [item], item["ran_before"], keep)}))
        if not found:
            raise OffsetsError(f"saved run {run.path}: no A/B record (run it with --perf-ab-base HEAD); nothing to fold")
    return save_all(stores.values())
