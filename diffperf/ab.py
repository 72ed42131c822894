"""Interleaved A/B: the head's rounds and a base worker's rounds in random-order pairs, judged on their ratios.

``--perf-ab-base REV`` checks ``REV`` out in a temporary git worktree (``git worktree add --detach``) and
runs its suite in a long-lived worker process (:mod:`diffperf.ab_worker`), by the head's interpreter or
by ``--perf-ab-python``; ``--perf-ab-python`` alone runs the head's own tree in the other interpreter.
For every case both sides are built (each cold start recorded) and warmed, then rounds come in pairs,
one head round and one base round in a seeded random order, one side running while the other waits
holding its pipeline. The verdict comes from the paired log-ratios (head/base), :func:`paired_compare`.

Note: a stored baseline compares rounds measured minutes or days apart, and a shared machine's speed
drifts by more than a regression in that time. Rounds taken in alternation see the same machine: the
drift cancels in each pair's ratio, which is why the pairs, not the two sets of rounds, are compared
(Abedi & Brecht, ICPE 2017; Bulej et al., ICPE 2020).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from diffperf import stats

WORKER_SOURCE = Path(__file__).with_name("ab_worker.py")
SUITE_FILES = ("diffperf/harness.py", "diffperf/cases.py", "diffperf/timing.py")
MIN_PAIRS = 10  # fewer pairs never decide "unchanged" (a bootstrap of a handful of pairs is too narrow)
BUILD_TIMEOUT_FLOOR_S = 1800.0  # a build (download, compile, autotune) may take long; a round may not
# Between-process offset (log sd) of two separately built sides of one tree: 0.9 % over 12 A/A runs of the
# two eager torch tiny cases on the 2-core CI VM (benchmarks/ab_calibration.py), rounded up.
PROCESS_CV = 0.01
SIDES = ("base", "head")  # how a single-value line names its two figures (the gate's: "baseline", "measured")


class AbError(Exception):
    """An A/B run that cannot go on; the message names the option, revision, interpreter or worker."""


class AbWorkerError(AbError):
    """The base worker died, hung, or answered a request with an error."""


class AbWorkerTimeout(AbWorkerError):
    """The base worker did not answer within ``--perf-ab-timeout``."""


class AbDoesNotFit(AbError):
    """The two sides of a case do not fit on the device together (the case is skipped)."""


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """The verdict on paired rounds: ratio = exp(median of log(head / base))."""

    verdict: str
    ratio: float
    ci_low: float
    ci_high: float
    confidence: float
    p_slower: float
    p_faster: float
    pairs: int
    min_detectable: float
    tolerance: float
    alpha: float
    process_cv: float = 0.0
    pairs_se: float = float("inf")  # bootstrap standard error of the median log-ratio, from the pairs alone
    processes: int = 1  # process pairs behind the verdict (diffperf/ab_replicate.py combines more than one)
    replicated: bool = False  # judged across process pairs (:func:`diffperf.ab_replicate.combine`)
    block_ratios: tuple = ()  # each process pair's own ratio, when replicated
    offset_source: str = ""  # where a one-pair verdict's offset spread came from (diffperf.ab_offsets), if measured

    @property
    def p_value(self) -> float:
        return self.p_faster if self.verdict == "improved" else self.p_slower

    @property
    def decided(self) -> bool:
        """Enough pairs: a regression or improvement is shown, the interval excludes both at the tolerance, or
        more pairs would hardly narrow it (their own error is under half the between-process offset)."""
        if self.verdict in ("regressed", "improved"):
            return True
        if self.replicated:
            return self.verdict == "unchanged"
        if self.pairs < MIN_PAIRS:
            return False
        return (self.ci_low > 1 - self.tolerance and self.ci_high < 1 + self.tolerance) or (
            self.process_cv > 0 and self.pairs_se <= self.process_cv / 2)

    def describe(self) -> str:
        if self.replicated and self.processes == 1:
            offset = (f"the {self.process_cv:.1%} first-pair offset measured in {self.offset_source}"
                      if self.offset_source else f"a {self.process_cv:.1%} between-process offset")
            return (f"A/B {self.verdict}: head/base ratio {self.ratio:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] "
                    f"over {self.pairs} pairs of 1 process pair (its interval allows {offset}, so no more pairs "
                    f"were needed), Wilcoxon p={self.p_value:.3g}, "
                    f"tolerance {self.tolerance:.0%}, smallest detectable slowdown {self.min_detectable:.1%}")
        if self.replicated:
            blocks = ", ".join(f"{r:.3f}" for r in self.block_ratios)
            return (f"A/B {self.verdict}: head/base ratio {self.ratio:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] "
                    f"over {self.processes} process pair{'s' if self.processes != 1 else ''} ({blocks}; "
                    f"{self.pairs} pairs), t-test p={self.p_value:.3g}, tolerance {self.tolerance:.0%}, smallest "
                    f"detectable slowdown {self.min_detectable:.1%}")
        return (f"A/B {self.verdict}: head/base ratio {self.ratio:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] over "
                f"{self.pairs} pairs (interval includes a {self.process_cv:.1%} between-process offset), Wilcoxon "
                f"p={self.p_value:.3g}, tolerance {self.tolerance:.0%}, smallest detectable slowdown "
                f"{self.min_detectable:.1%}")


def _wilcoxon_p(d: np.ndarray, alternative: str) -> float:
    from scipy.stats import wilcoxon

    if d.size < 2 or not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, alternative=alternative).pvalue)


def paired_compare(head: Sequence[float], base: Sequence[float], tolerance: float = 0.10, alpha: float = 0.01,
                   n_boot: int = stats.DEFAULT_BOOT, seed: int = stats.DEFAULT_SEED, power: float = 0.8,
                   process_cv: float = PROCESS_CV) -> PairedComparison:
    """The A/B decision on paired round times (``head[i]`` and ``base[i]`` measured back to back).

    Effect: the median of the paired log-ratios, as a ratio, with a percentile bootstrap interval (pairs
    resampled, confidence ``1 - alpha``); significance: one-sided Wilcoxon signed-rank tests on the
    log-ratios. The verdict follows the gate's rule (:func:`diffperf.stats.compare_samples`): ``regressed``
    needs ``p_slower < alpha``, the interval reaching ``1 + tolerance`` and the ratio above
    ``1 + tolerance / 2``; ``improved`` the mirror image; ``unchanged`` when the interval lies inside
    ``(1 - tolerance, 1 + tolerance)`` (a change of the tolerance's size is ruled out), or as the gate says
    it (ratio within half the tolerance, pairs able to detect the tolerance), from ``MIN_PAIRS`` pairs on;
    else ``inconclusive``.
    ``min_detectable`` is the slowdown the pairs detect with probability ``power``
    (bootstrap standard error of the median log-ratio).

    Note: the pairs cancel the machine's drift, but each side is one process, and two processes built from
    the same tree differ by a fixed offset of their own (memory layout, allocator and thread placement):
    measured here, A/A offsets with a 0.9 % standard deviation and up to 2.3 %, each significant on its
    pairs alone. No number of pairs averages that away, so ``process_cv`` (``--perf-ab-process-cv``, the
    log standard deviation of that offset) is added in quadrature to the interval's half-widths and to the
    standard error behind ``min_detectable``, and ``regressed`` / ``improved`` also need the widened
    interval to exclude 1. With ``process_cv=0`` the pairs' own bootstrap decides alone.
    """
    h, b = stats._arr(head), stats._arr(base)
    if h.size != b.size:
        raise ValueError(f"paired samples differ in length: {h.size} head, {b.size} base")
    d = np.log(h / b)
    confidence = 1 - alpha if alpha < 0.5 else 0.95
    rng = np.random.default_rng(seed)
    if d.size >= 2:
        boot = np.median(d[rng.integers(0, d.size, size=(n_boot, d.size))], axis=1)
        tail = (1 - confidence) / 2 * 100
        low, high = (float(x) for x in np.percentile(boot, [tail, 100 - tail]))
        pairs_se = float(np.std(boot, ddof=1))
        se = math.hypot(pairs_se, process_cv)
        mds = math.expm1((stats._z(1 - alpha) + stats._z(power)) * se)
        m, zp = float(np.median(d)), stats._z(1 - (1 - confidence) / 2) * process_cv
        low, high = m - math.hypot(m - low, zp), m + math.hypot(high - m, zp)
    else:
        low = high = float(d[0])
        mds = pairs_se = float("inf")
    ratio = math.exp(float(np.median(d)))
    ci_low, ci_high = math.exp(low), math.exp(high)
    p_slow, p_fast = _wilcoxon_p(d, "greater"), _wilcoxon_p(d, "less")
    verdict = decide(ratio, ci_low, ci_high, p_slow, p_fast, mds, tolerance, alpha, d.size >= MIN_PAIRS)
    return PairedComparison(verdict, ratio, ci_low, ci_high, confidence, p_slow, p_fast, int(d.size), mds,
                            tolerance, alpha, process_cv, pairs_se)


def decide(ratio: float, ci_low: float, ci_high: float, p_slow: float, p_fast: float, min_detectable: float,
           tolerance: float, alpha: float, enough: bool) -> str:
    """The verdict rule shared by one process pair (:func:`paired_compare`) and several
    (:func:`diffperf.ab_replicate.combine`); ``enough``: enough data to call it "unchanged"."""
    half = tolerance / 2
    if p_slow < alpha and ci_low > 1 and ci_high >= 1 + tolerance and ratio > 1 + half:
        return "regressed"
    if p_fast < alpha and ci_high < 1 and ci_low <= 1 - tolerance and ratio < 1 - half:
        return "improved"
    if enough and ((ci_low > 1 - tolerance and ci_high < 1 + tolerance)
                   or (abs(ratio - 1) <= half and min_detectable <= tolerance)):
        return "unchanged"
    return "inconclusive"


def pair_orders(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` pair orders, each ``"HB"`` (head first) or ``"BH"``, drawn from ``rng``."""
    return ["HB" if x else "BH" for x in rng.integers(0, 2, size=n)]


def order_seed(seed: int, test_id: str) -> int:
    """The seed of a test's pair orders: reproducible from the run's ``--perf-seed`` and the test id."""
    return (int(seed) * 1_000_003 + zlib.crc32(test_id.encode())) % 2**32


# --------------------------------------------------------------------------------------------------
# git
# --------------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=check, timeout=300)


def repo_root(path: Path) -> Path:
    """The git top-level folder of ``path``; :class:`AbError` when it is not in a git checkout."""
    try:
        out = _git(path, "rev-parse", "--show-toplevel", check=False)
    except FileNotFoundError:
        raise AbError("--perf-ab-base needs git, which is not installed") from None
    if out.returncode:
        raise AbError(f"--perf-ab-base: {path} is not inside a git checkout ({out.stderr.strip()})")
    return Path(out.stdout.strip())


def resolve_revision(repo: Path, rev: str, suite_dir: str = "") -> str:
    """The commit id ``rev`` names, checked to contain the suite; :class:`AbError` names the revision."""
    out = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if out.returncode or not out.stdout.strip():
        raise AbError(f"--perf-ab-base {rev!r}: unknown revision in {repo} (try a branch, tag or commit id; "
                      f"for a pull request's base, fetch it first)")
    sha = out.stdout.strip()
    prefix = f"{suite_dir.strip('/')}/" if suite_dir.strip("/") else ""
    missing = [f for f in SUITE_FILES if _git(repo, "cat-file", "-e", f"{sha}:{prefix}{f}", check=False).returncode]
    if missing:
        raise AbError(f"--perf-ab-base {rev!r} ({sha[:12]}): the revision has no diffperf suite "
                      f"(missing {', '.join(prefix + m for m in missing)})")
    return sha


def head_commit(path: Path) -> dict:
    """``{"id", "dirty"}`` of the checkout at ``path`` (``{}`` outside git)."""
    try:
        sha = _git(path, "rev-parse", "HEAD", check=False).stdout.strip()
        dirty = bool(_git(path, "status", "--porcelain", "--untracked-files=no", check=False).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"id": sha or None, "dirty": dirty}


def check_python(python: str) -> str:
    """The absolute path of the ``--perf-ab-python`` interpreter; :class:`AbError` if it is missing or broken."""
    exe = shutil.which(python) if os.sep not in python else python
    if not exe or not os.path.isfile(exe) or not os.access(exe, os.X_OK):
        raise AbError(f"--perf-ab-python {python}: no such executable interpreter")
    try:
        out = subprocess.run([exe, "-c", "import sys; print(sys.version_info >= (3, 10))"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise AbError(f"--perf-ab-python {python}: cannot run it ({exc})") from None
    if out.returncode or out.stdout.strip() != "True":
        raise AbError(f"--perf-ab-python {python}: not a Python >= 3.10 interpreter "
                      f"({(out.stderr or out.stdout).strip()[-200:]})")
    return os.path.abspath(exe)


# --------------------------------------------------------------------------------------------------
# The base worker
# --------------------------------------------------------------------------------------------------


class BaseWorker:
    """A running :mod:`diffperf.ab_worker` process: JSON-line requests with a timeout each."""

    def __init__(self, python: str, tree: Path, scratch: Path, timeout_s: float, env: dict | None = None,
                 side: str = "base"):
        self.python, self.tree, self.timeout_s, self.side = python, Path(tree), float(timeout_s), side
        Path(scratch).mkdir(parents=True, exist_ok=True)
        script = Path(scratch) / "diffperf_ab_worker.py"
        shutil.copyfile(WORKER_SOURCE, script)
        self.log_path = Path(scratch) / "worker.log"
        self._log = open(self.log_path, "w+b")
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join([str(self.tree), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                if p and Path(p).resolve() != self.tree.resolve()]])
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTHONSAFEPATH", None)
        # A session of its own: Ctrl-C at the terminal reaches the head, which then closes the worker.
        self.proc = subprocess.Popen([python, "-u", str(script)], cwd=str(self.tree), env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, start_new_session=True)
        self.busy = False
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def log_tail(self, n: int = 15) -> str:
        try:
            self._log.flush()
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-n:])

    def request(self, cmd: str, timeout_s: float | None = None, **kwargs: Any) -> dict:
        """Send one request and wait for its answer; :class:`AbWorkerError` names what went wrong."""
        self.send(cmd, **kwargs)
        return self.receive(cmd, timeout_s)

    def send(self, cmd: str, **kwargs: Any) -> None:
        """Send a request without waiting (:meth:`receive` takes its answer): two workers can work at once."""
        if self.proc.poll() is not None:
            raise self._died(cmd)
        self.busy = True  # until the answer comes: a worker interrupted mid-request is killed, not asked
        try:
            self.proc.stdin.write((json.dumps({"cmd": cmd, **kwargs}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(cmd) from None

    def receive(self, cmd: str, timeout_s: float | None = None) -> dict:
        """The answer to the request :meth:`send` sent (``cmd`` names it in errors)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AbWorkerTimeout(f"A/B {self.side} worker ({self.python}, {self.tree}) did not answer {cmd!r} within "
                                  f"{timeout:.0f} s (--perf-ab-timeout); killed it. Its last output:\n"
                                  f"{self.log_tail()}") from None
        if line is None:
            self.proc.wait(timeout=30)
            raise self._died(cmd)
        self.busy = False
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            raise AbWorkerError(f"A/B {self.side} worker sent a line that is not JSON in answer to {cmd!r}: {line[:200]!r}") from None
        if not answer.get("ok"):
            raise AbWorkerError(f"A/B {self.side} worker failed {cmd!r}: {answer.get('error')}\n{self.log_tail()}")
        return answer

    def start_held_build(self, case, **kwargs: Any) -> None:
        """Ask the worker to build ``case`` and hold it before its first call, without waiting: :meth:`await_built`
        reads its "built" answer, :meth:`first_call` then lets it make the first call (cold start, compile). So two
        workers can build at once and make their first calls one at a time. A held worker reads any line but "go"
        as "exit"."""
        self.send("build", case=case.as_dict(), hold=True, **kwargs)

    def await_built(self, timeout_s: float) -> dict:
        """The held build's ``{"stage": "built"}`` answer (:meth:`start_held_build`)."""
        return self.receive("build", timeout_s)

    def first_call(self, timeout_s: float) -> dict:
        """Let a held, built pipeline make its first call; the build's answer (cold start, peaks, builder file)."""
        self.send("go")
        return self.receive("build", timeout_s)

    def _died(self, cmd: str) -> AbWorkerError:
        code = self.proc.poll()
        return AbWorkerError(f"A/B {self.side} worker ({self.python}, {self.tree}) crashed (exit status {code}) during "
                             f"{cmd!r}. Its last output:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def close(self) -> None:
        """Ask the worker to exit (a few seconds' grace), else kill it; idempotent."""
        if self.proc.poll() is None and not self.busy:
            try:
                self.request("close", timeout_s=30)
            except AbWorkerError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        for fh in (self.proc.stdin, self.proc.stdout, self._log):
            try:
                fh.close()
            except OSError:  # pragma: no cover
                pass


def _check_imports(hello: dict, tree: Path, side: str = "base") -> None:
    """A worker must run its own tree's diffperf and pipelines (the base worker: not the head's editable install)."""
    tree = Path(tree).resolve()
    files = [hello["diffperf_file"], *(hello.get("pipelines_path") or [])[:1]]
    wrong = [f for f in files if not f or not Path(f).resolve().is_relative_to(tree)]
    if wrong:
        raise AbError(f"A/B {side} worker imported {', '.join(map(str, wrong))} instead of the {side} tree {tree}: "
                      f"something on that interpreter's path (a .pth file, sitecustomize) puts another diffperf first")


# --------------------------------------------------------------------------------------------------
# The session's A/B side: worktree + worker, created on first use, removed on exit
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AbSettings:
    rootdir: Path
    base_rev: str | None = None
    python: str | None = None
    timeout_s: float = 600.0
    seed: int = 0
    base_sha: str | None = None  # resolved at configure time
    repo: Path | None = None
    suite_dir: str = ""  # the rootdir relative to the git top level
    malloc: str = "steady"  # --perf-malloc, applied in the worker too
    processes: int = 1  # --perf-ab-processes: the most process pairs a case is measured in
    case_time_s: float = 600.0  # --perf-ab-max-time: the most seconds a case's further process pairs take in all


def configure(rootdir: Path, base_rev: str | None, python: str | None, timeout_s: float, seed: int,
              malloc: str = "steady", processes: int = 1, case_time_s: float = 600.0) -> AbSettings | None:
    """Validate the A/B options up front (:class:`AbError` naming the bad one); ``None`` without A/B."""
    if base_rev is None and python is None:
        return None
    s = AbSettings(Path(rootdir).resolve(), base_rev, python, timeout_s, seed, malloc=malloc, processes=processes,
                   case_time_s=case_time_s)
    if python is not None:
        s.python = check_python(python)
    if base_rev is not None:
        s.repo = repo_root(s.rootdir)
        s.suite_dir = str(s.rootdir.relative_to(s.repo.resolve())) if s.rootdir != s.repo.resolve() else ""
        s.base_sha = resolve_revision(s.repo, base_rev, s.suite_dir)
    return s


@dataclasses.dataclass
class _HeldBuild:
    """A build the worker started beside the head's (:meth:`AbSession.start_build`), answered in two lines."""

    case: Any
    worker: BaseWorker
    built: bool = False  # its {"stage": "built"} answer has been read
    error: AbWorkerError | None = None  # the build failed: :meth:`AbSession.build` reports it


class AbSession:
    """The base side of a run: one worktree and one worker, started lazily and closed on every exit path."""

    def __init__(self, settings: AbSettings):
        self.settings = settings
        self.worker: BaseWorker | None = None
        self.hello: dict | None = None
        self.scratch: Path | None = None
        self.worktree: Path | None = None
        self.fatal: str | None = None
        self.base_tree: Path | None = None
        self.base_python: str | None = None
        self.replicas: list = []  # workers of the further process pairs now running (closed on every exit path)
        self.pool: dict = {}  # process pair index -> (head worker, base worker) kept for the next case
        self._preloading: BaseWorker | None = None  # the worker whose "preload" answer is still to be read
        self._held: _HeldBuild | None = None  # a case the worker builds beside the head's, held before its first call
        self._closed = False
        self._old_sigterm = None
        self.head_commit = head_commit(settings.rootdir)

    @property
    def build_timeout_s(self) -> float:
        """How long an import or a build may take in a worker (``--perf-ab-timeout``, at least the build floor)."""
        return max(self.settings.timeout_s, BUILD_TIMEOUT_FLOOR_S)

    @property
    def base_commit(self) -> dict:
        s = self.settings
        if s.base_sha:
            return {"id": s.base_sha, "rev": s.base_rev, "dirty": False}
        return dict(self.head_commit, rev="(head tree)")

    def start(self) -> BaseWorker:
        """The worker, created (worktree checked out, process started, imports verified) on first call.

        A worker that died is replaced; a side that failed to start fails every later case the same way.
        """
        if self.fatal:
            raise AbError(self.fatal)
        if self.worker is not None and self.worker.proc.poll() is None:
            return self.worker
        self.discard_worker()
        try:
            return self._start()
        except AbError as exc:
            self.fatal = str(exc)
            self.discard_worker()
            raise

    def _start(self) -> BaseWorker:
        s = self.settings
        if self.scratch is None:
            self._install_cleanup()
            self.scratch = Path(tempfile.mkdtemp(prefix="diffperf-ab-"))
        tree = s.rootdir
        if s.base_sha:
            if self.worktree is None:
                worktree = self.scratch / "base"
                out = _git(s.repo, "worktree", "add", "--detach", str(worktree), s.base_sha, check=False)
                if out.returncode:
                    raise AbError(f"--perf-ab-base {s.base_rev!r}: git worktree add failed: {out.stderr.strip()}")
                self.worktree = worktree
            tree = self.worktree / s.suite_dir if s.suite_dir else self.worktree
        self.base_tree, self.base_python = tree, s.python or _head_python()
        self.worker, self.hello = self.spawn("base", self.scratch)
        return self.worker

    def spawn(self, side: str, scratch: Path) -> tuple[BaseWorker, dict]:
        """A started, import-checked worker of one side: ``"base"`` runs the base tree (by ``--perf-ab-python``
        when given), ``"head"`` this tree by this interpreter. Returns the worker and its ``hello`` answer."""
        return self.spawn_many([(side, scratch)])[0]

    def spawn_many(self, specs: Sequence[tuple[str, Path]]) -> list[tuple[BaseWorker, dict]]:
        """Workers of ``(side, scratch folder)`` started at once (their imports overlap), then each checked."""
        s = self.settings
        started: list[tuple[BaseWorker, str, Path, str]] = []
        try:
            for side, scratch in specs:
                python, tree = (self.base_python, self.base_tree) if side == "base" else (_head_python(), s.rootdir)
                started.append((BaseWorker(python, tree, scratch, s.timeout_s,
                                           env=dict(os.environ, DIFFPERF_AB_MALLOC=s.malloc), side=side),
                                python, tree, side))
            for worker, *_ in started:
                worker.send("hello")
            out = []
            for worker, python, tree, side in started:
                try:
                    hello = worker.receive("hello", timeout_s=max(s.timeout_s, 120.0))
                except AbWorkerError as exc:
                    raise AbError(f"A/B {side} side ({python}, tree {tree}) does not start: {exc}") from None
                _check_imports(hello, tree, side)
                out.append((worker, hello))
            return out
        except BaseException:
            for worker, *_ in started:
                worker.close()
            raise

    def discard_worker(self) -> None:
        """Kill the worker (after a crash or a hang) so the next case starts a fresh one."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.close()

    def _install_cleanup(self) -> None:
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def on_term(signum, frame):
                raise KeyboardInterrupt  # pytest stops the session as on Ctrl-C: sessionfinish -> close()

            self._old_sigterm = signal.signal(signal.SIGTERM, on_term)

    def close(self) -> None:
        """Stop the worker and remove the worktree and scratch folder (idempotent; never raises)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.discard_worker()
        except Exception:  # pragma: no cover - best effort on the way out
            pass
        for worker in list(self.replicas):
            try:
                worker.close()
            except Exception:  # pragma: no cover
                pass
        self.replicas.clear()
        self.pool.clear()
        if self.worktree is not None and self.settings.repo is not None:
            _git(self.settings.repo, "worktree", "remove", "--force", str(self.worktree), check=False)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self.settings.repo is not None and self.worktree is not None:
            _git(self.settings.repo, "worktree", "prune", check=False)
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
        try:
            atexit.unregister(self.close)
        except Exception:  # pragma: no cover
            pass

    # -- one case ----------------------------------------------------------------------------------

    def preload(self, case) -> None:
        """Start importing ``case``'s stack in the worker (started first when needed) and return at once;
        :meth:`await_preload` waits for it. A side that cannot start or import is left for :meth:`build` to
        report, with the case named.

        Note: the test process imports the same stack just before it builds the head (``harness.prepare``), and
        imports are mostly one thread each, so on two cores the two imports overlap instead of following one
        another. Nothing is built or timed on either side until both are done. Measured on the 2-core VM (default
        CPU matrix, the base worker's "build and first call" in 6 A/B runs before, 3 after): torch's case 6.2-6.4 s
        before, 0.7-0.8 s after (its import now runs before the first test, beside the test process's own), TF
        graph's 12.0-13.3 s before, 9.4-10.4 s after.
        """
        self.cancel_build()  # a worker held before a first call reads any other line as "exit"
        try:
            worker = self.start()
            self.await_preload()
            worker.send("preload", case=case.as_dict())
        except AbError:
            return
        self._preloading = worker

    def await_preload(self) -> None:
        """Wait for the worker's imports that :meth:`preload` started (a failure is :meth:`build`'s to report:
        a worker that died is discarded, so the build starts a fresh one and names what is wrong)."""
        worker, self._preloading = self._preloading, None
        if worker is None or worker is not self.worker:
            return
        try:
            worker.receive("preload", self.build_timeout_s)
        except AbWorkerError:
            if worker.proc.poll() is not None or worker.busy:
                self.discard_worker()

    def start_build(self, case) -> None:
        """Start building ``case`` in the worker, held before its first call, and return at once (the head builds
        its own meanwhile); :meth:`await_built` waits for the build, :meth:`build` lets the worker make its first
        call. A side that cannot start is left for :meth:`build` to report, with the case named.

        Note: a build is mostly one thread (Keras traces TF's models in Python; Flax initializes its parameters
        op by op), so on two cores the head's and the base's builds overlap instead of following one another, as
        a further process pair's two workers do (:mod:`diffperf.ab_replicate`). The first calls (cold start,
        compile) stay one at a time: the head's while the base worker holds its built pipeline, the base's when
        the latency test pairs them. Only the two build figures (``build_s``, not gated) carry the contention.
        """
        self.await_preload()
        self.cancel_build()
        try:
            worker = self.start()
            worker.start_held_build(case)
        except AbError:
            return
        self._held = _HeldBuild(case, worker)

    def await_built(self) -> None:
        """Wait until the build :meth:`start_build` started is built (a failure is kept for :meth:`build`)."""
        held = self._held
        if held is None or held.built or held.error is not None:
            return
        with _progress(f"A/B base {held.case.id}: build in the base worker (beside the head's)"):
            try:
                held.worker.await_built(self.build_timeout_s)
                held.built = True
            except AbWorkerError as exc:
                held.error = exc

    def cancel_build(self, case=None) -> None:
        """End a held build (of ``case`` only, when given) that no latency test will take: its head failed, or its
        test did not run. A held worker takes no other request, so it exits and the next case starts a fresh one."""
        held = self._held
        if held is None or (case is not None and held.case != case):
            return
        self._held = None
        if held.worker is self.worker:
            self.discard_worker()
        else:
            held.worker.close()

    def build(self, case) -> dict:
        """Build ``case`` in the worker (or let the build :meth:`start_build` started make its first call); a
        device-memory failure becomes :class:`AbDoesNotFit`."""
        held = self._held
        if held is not None and held.case == case and held.worker is self.worker and held.worker.proc.poll() is None:
            self.await_built()
            self._held = None
            try:
                if held.error is not None:
                    raise held.error
                with _progress(f"A/B base {case.id}: first call in the base worker"):
                    return dict(held.worker.first_call(self.build_timeout_s), built_beside_head=True)
            except AbWorkerError as exc:
                raise build_error(exc, case, "base", self.hello.get("python") if self.hello else "?",
                                  "next to the head's pipeline") from None
        self.cancel_build()
        self.await_preload()
        worker = self.start()
        try:
            with _progress(f"A/B base {case.id}: build and first call in the base worker"):
                return worker.request("build", timeout_s=self.build_timeout_s,
                                      case=case.as_dict())
        except AbWorkerError as exc:
            raise build_error(exc, case, "base", self.hello.get("python") if self.hello else "?",
                              "next to the head's pipeline") from None


def build_error(exc: AbWorkerError, case, side: str, python: str, where: str) -> AbError:
    """A worker's failed build, named: a missing stack, a build that ran out of device memory
    (:class:`AbDoesNotFit`, ``where`` says beside what), else the worker's own error."""
    text = str(exc)
    if "ModuleNotFoundError" in text or "ImportError" in text:
        return AbError(f"the A/B {side} side ({python}) lacks the {case.framework} stack for {case.id}: "
                       f"{text.splitlines()[0]}")
    if "out of memory" in text.lower() or "OutOfMemory" in text or "RESOURCE_EXHAUSTED" in text:
        return AbDoesNotFit(f"the {side} side of {case.id} does not fit on the device {where}: {text.splitlines()[0]}")
    return exc


def _head_python() -> str:
    import sys

    return sys.executable


def check_fits(case, head_peak_bytes: int | None) -> None:
    """Raise :class:`AbDoesNotFit` when a CUDA device lacks the free memory for a second copy of the case."""
    if case.device != "cuda" or not head_peak_bytes:
        return
    try:
        import torch

        free, _total = torch.cuda.mem_get_info()
    except Exception:  # no torch or no CUDA in this process: the base build will tell
        return
    need = int(head_peak_bytes * 1.05)
    if free < need:
        raise AbDoesNotFit(f"the two sides of {case.id} do not fit on the GPU together: the head's pipeline peaked "
                           f"at {stats.fmt_bytes(head_peak_bytes)}, {stats.fmt_bytes(free)} free for the base side")


# --------------------------------------------------------------------------------------------------
# The interleaved measurement
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PairsResult:
    head: list[float]
    base: list[float]
    order: list[str]
    comparison: PairedComparison
    head_warm: list[float]
    base_warm: list[float]
    seconds: float


def run_pairs(head_round: Callable[[], float], base_round: Callable[[], float], *, min_pairs: int, warmup_rounds: int,
              max_time_s: float, tolerance: float, alpha: float, seed: int, max_pairs: int = 400,
              compare: Callable[..., PairedComparison] = paired_compare,
              done: Callable[[PairedComparison], bool] | None = None,
              clock: Callable[[], float] = time.perf_counter) -> PairsResult:
    """Warm both sides (alternating), then take pairs in random order until decided or ``max_time_s`` is spent.

    At least ``min_pairs`` pairs; then, while ``done`` (default :attr:`PairedComparison.decided`) is false
    and the budget allows, batches of half as many pairs again (at least 4), each sized from the pairs' mean
    time so far and cut short when ``max_time_s`` runs out (measured on the 2-core VM with another job on its
    cores: rounds that slowed mid-batch took one process pair's rounds to 204 s of a 120 s limit). Only one side
    runs at a time.
    """
    done = done or (lambda c: c.decided)
    rng = np.random.default_rng(seed)
    head_warm, base_warm = [], []
    for _ in range(warmup_rounds):
        head_warm.append(head_round())
        base_warm.append(base_round())
    head, base, order = [], [], []
    start = clock()

    def take(n: int, deadline: float = math.inf) -> None:
        for o in pair_orders(rng, n):
            if clock() >= deadline:
                break
            if o == "HB":
                h = head_round()
                b = base_round()
            else:
                b = base_round()
                h = head_round()
            head.append(h)
            base.append(b)
            order.append(o)

    take(max(min_pairs, 2))
    cmp = compare(head, base, tolerance=tolerance, alpha=alpha)
    while not done(cmp) and len(head) < max_pairs:
        elapsed = clock() - start
        pair_s = elapsed / len(head)
        room = int((max_time_s - elapsed) // pair_s) if pair_s > 0 else max_pairs
        n = min(max(4, len(head) // 2), room, max_pairs - len(head))
        if n < 1:
            break
        taken = len(head)
        take(n, start + max_time_s)
        if len(head) == taken:
            break
        cmp = compare(head, base, tolerance=tolerance, alpha=alpha)
    return PairsResult(head, base, order, cmp, head_warm, base_warm, clock() - start)


def _record_rounds(benchmark, samples: Sequence[float]) -> None:
    """Hand the head's measured round times to the pytest-benchmark fixture as its stats.

    Note: pytest-benchmark times rounds in its own loop (``pedantic``), one call after another, with no
    way to run the base's round between two of them and stop when the pairs decide. The head's rounds are
    therefore timed here (synchronized before each clock read, as ``pedantic`` would) and given to the
    fixture's stats object, so saved runs and ``pytest-benchmark compare`` read the head's rounds as usual.
    """
    bench_stats = benchmark._make_stats(1)
    benchmark._mode = "diffperf A/B pairs"
    for s in samples:
        bench_stats.update(s)


@dataclasses.dataclass
class AbOutcome:
    failed: bool
    message: str
    info: dict[str, Any]


def judge(test_id: str, head: dict, base: dict, cmp: PairedComparison, memory_tolerance: float,
          compile_tolerance: float, memory_pairs: Sequence[dict] = (), compile_pairs: Sequence[dict] = (),
          memory_offset=None, offset_note: str | None = None, stopped: str | None = None) -> AbOutcome:
    """The A/B verdict of a test: latency from the pairs, peak memory and compile time as single values.

    ``memory_pairs`` / ``compile_pairs`` (``{"head", "base", "kind_head", "kind_base"}`` of each further
    process pair, whose two workers were started alike) replace the first pair's figures when given: see
    :func:`_across_pairs`. Without further pairs, ``memory_offset`` (the case's stored A/A offsets of this
    selection, an :class:`diffperf.ab_offsets.OffsetPrior` with a ``memory_range``) is the first pair's memory
    ratio under no change: see :func:`_first_pair_memory`; without those either, the first pair's memory (but
    a device allocator's reset peak) and compile figures are not judged beyond their tolerance
    (:func:`_first_pair_alone`; ``offset_note`` says why no stored range applied). ``stopped`` (why no further
    process pair was added) follows the latency line.
    """
    from diffperf.gate import _single_value, _steady_memory, first_pipeline_mismatch

    lines = [cmp.describe(), *([stopped] if stopped else [])]
    failures = ["latency"] if cmp.verdict == "regressed" else []
    head_mem, base_mem = (_steady_memory(side.get("peak_memory_bytes")) for side in (head, base))
    aa = getattr(memory_offset, "memory_range", None)
    if aa and not memory_pairs:
        mem_v, mem_line = _first_pair_memory(head_mem, base_mem, aa, memory_offset.memory_observations,
                                             memory_tolerance)
    else:
        mem_v, mem_line = _single_value("peak memory (head vs base)", head_mem, base_mem, memory_tolerance,
                                        stats.fmt_bytes, SIDES)
        if not memory_pairs and head.get("memory_kind") not in RESET_PEAK_MEMORY_KINDS:
            mem_v, mem_line = _first_pair_alone(mem_v, mem_line, offset_note)
    if head.get("memory_kind") != base.get("memory_kind"):
        mem_v, mem_line = "not compared", (f"peak memory: head measured as {head.get('memory_kind')}, base as "
                                           f"{base.get('memory_kind')}; not compared")
    elif mem_line and first_pipeline_differs(head.get("first_in_process"), base.get("first_in_process")):
        mem_v, mem_line = "not compared", first_pipeline_mismatch(("head", bool(head["first_in_process"])),
                                                                  ("base", bool(base["first_in_process"])))
    if memory_pairs:
        mem_v, mem_line = _across_pairs("peak memory", memory_pairs, memory_tolerance, stats.fmt_bytes)
    comp_v, comp_line = _single_value("compile time (head vs base)", head.get("compile_s"), base.get("compile_s"),
                                      compile_tolerance, stats.fmt_seconds, SIDES)
    if comp_line and head.get("compile_kind") != base.get("compile_kind"):
        comp_v, comp_line = "not compared", (f"compile time: head measured as {head.get('compile_kind')}, base as "
                                             f"{base.get('compile_kind')}; not compared")
    if compile_pairs and comp_line:
        comp_v, comp_line = _across_pairs("compile time", compile_pairs, compile_tolerance, stats.fmt_seconds)
    elif not compile_pairs:
        comp_v, comp_line = _first_pair_alone(comp_v, comp_line)
    for verdict, line, name in ((mem_v, mem_line, "peak memory"), (comp_v, comp_line, "compile time")):
        if line:
            lines.append(line)
        if verdict == "regressed":
            failures.append(name)
    headline = f"{test_id}: A/B {' and '.join(failures)} regressed" if failures else f"{test_id}: A/B {cmp.verdict}"
    return AbOutcome(bool(failures), "\n".join([headline, *("  " + ln for ln in lines)]),
                     {"memory_verdict": mem_v, "compile_verdict": comp_v})


# Memory kinds that count the case's own live allocations after a reset of the device allocator's peak, whatever the
# process ran before: the first pair's figures of these keep the single-value rule. Every other kind depends on the
# process' history (host RSS growth: measured, TF XLA tiny grew 174-179 MiB in the test process and 120-142 MiB in
# the base worker of one tree; JAX's peak cannot be reset, see pipelines/flax_sd.py) and is not judged on one pair.
RESET_PEAK_MEMORY_KINDS = ("cuda_allocator_peak", "tf_gpu_allocator_peak")


def _first_pair_alone(verdict: str, line: str | None, note: str | None = None) -> tuple[str, str | None]:
    """A first pair's single-value figure (peak memory, compile seconds) judged with nothing to judge it
    against: a "regressed" or "improved" of :func:`diffperf.gate._single_value` becomes "inconclusive", saying why.

    Note: the first pair is the test process and the base worker, and what a process ran before a case moves these
    figures beyond any tolerance (measured, one tree, ``--perf-ab-processes 1``: TF XLA tiny's peak memory ratio
    1.255-1.579 and its compile time 11.5 vs 7.69 s; in A/A runs of the default CPU matrix 1.06-1.18). Fresh
    process pairs (:func:`_across_pairs`), or a stored A/A range of the same selection
    (:func:`_first_pair_memory`), can tell a change from that; one pair alone cannot."""
    if verdict not in ("regressed", "improved") or not line:
        return verdict, line
    return "inconclusive", (line.replace(f" {verdict}: ", " inconclusive: ", 1) + "; beyond the tolerance on the "
                            "first process pair alone, whose two processes ran different cases before it: not called "
                            "without further process pairs (--perf-ab-processes) or stored A/A first pairs of this "
                            "selection" + (f" ({note})" if note else ""))


def _first_pair_memory(head: float | None, base: float | None, aa: tuple[float, float], runs: int,
                       tolerance: float) -> tuple[str, str | None]:
    """The first pair's peak memory judged against ``aa``, the lowest and highest head / base ratio of the case's
    stored A/A first pairs: "regressed" beyond the highest by more than the tolerance, "unchanged" within the
    tolerance of the lowest (no growth beyond the tolerance, whatever the pair's offset), else "inconclusive".

    Note: a smaller figure is not called "improved" on one process pair: measured, A/A first pairs of the default
    CPU matrix reached 0.83 (fp32 SDPA, 5 stored runs 0.91-0.99) and 0.95 (JAX jit, stored 1.06-1.11)."""
    from diffperf.gate import _single_value

    if head is None or base is None or base <= 0:
        return _single_value("peak memory (head vs base)", head, base, tolerance, stats.fmt_bytes, SIDES)
    lo, hi = aa
    ratio = head / base
    if ratio / hi > 1 + tolerance:
        verdict, rule = "regressed", f"beyond the highest by more than the tolerance ({tolerance:.0%})"
    elif ratio / lo <= 1 + tolerance:
        verdict, rule = "unchanged", (f"no growth beyond the tolerance ({tolerance:.0%}) of the lowest; a smaller "
                                      "figure is not called an improvement on one process pair")
    else:
        verdict, rule = "inconclusive", f"beyond the lowest by more than the tolerance ({tolerance:.0%}), not the highest"
    return verdict, (f"peak memory (head vs base) {verdict}: {stats.fmt_bytes(head)} vs {stats.fmt_bytes(base)}, "
                     f"ratio {ratio:.3f} against {lo:.3f}-{hi:.3f} in {runs} stored A/A first pairs: {rule} "
                     "(single value: no statistical test)")


def first_pipeline_differs(head: bool | None, base: bool | None) -> bool:
    """Whether one side built the case as its framework's first pipeline in its process and the other did not
    (``first_in_process`` of each; ``None``, from a base tree that predates it, is not a difference).

    Note: in the first process pair this is the rule, not the exception, for a run's first torch case: the
    test process built torch pipelines before it (``perf/test_harness_accuracy.py``, the fidelity reference),
    the base worker did not. Measured, 19 A/A runs of the default CPU matrix (2026-11-30): tiny fp32 classic grew
    34-53 MiB in the test process and 92-93 MiB in the base worker, and the single-value rule called its peak
    memory "improved" in all 12 runs that settled it on the first pair. Such figures are not compared, and do not
    ask for fresh process pairs either.
    """
    return head is not None and base is not None and bool(head) != bool(base)


def _across_pairs(name: str, pairs: Sequence[dict], tolerance: float, fmt) -> tuple[str, str | None]:
    """A single-value figure (peak memory, compile seconds) judged on the further process pairs: "regressed"
    when the head's figure is beyond the tolerance in every one of them, "improved" the mirror image, else
    "unchanged"; a change seen in fewer than :data:`diffperf.ab_replicate.MIN_FRESH_SINGLE` pairs is
    "inconclusive" (it does not fail the test).

    Note: the first pair is the test process and the base worker, and what a process ran before a case moves
    its figures (measured, same tree: TF XLA tiny grew 203 MiB in the test process and 171 MiB in the base
    worker, and compiled in 5.39 s and 4.12 s). The two workers of a further pair are started, built and
    measured alike, so their figures compare; a real change shows in every pair, a process's accident does not.
    """
    kinds = {(p.get("kind_head"), p.get("kind_base")) for p in pairs}
    if any(h != b for h, b in kinds) or len({h for h, _ in kinds}) != 1:
        return "not compared", f"{name}: measured as {sorted(map(str, kinds))} across process pairs; not compared"
    usable = [p for p in pairs if p.get("head") and p.get("base")]
    if not usable:
        return "not compared", None
    from diffperf.ab_replicate import MIN_FRESH_SINGLE

    ratios = [p["head"] / p["base"] for p in usable]
    if min(ratios) > 1 + tolerance:
        verdict = "regressed"
    elif max(ratios) < 1 - tolerance:
        verdict = "improved"
    else:
        verdict = "unchanged"
    few = verdict != "unchanged" and len(usable) < MIN_FRESH_SINGLE
    verdict = "inconclusive" if few else verdict
    shown = ", ".join(f"{fmt(p['head'])} vs {fmt(p['base'])}" for p in usable)
    return verdict, (f"{name} (head vs base) {verdict} across {len(usable)} fresh process pair(s): {shown}, "
                     f"ratios {', '.join(f'{r:.3f}' for r in ratios)} (tolerance {tolerance:.0%} in every pair"
                     + (f"; {MIN_FRESH_SINGLE} pairs needed to call it)" if few else ")"))


def _compile_figure(base_stats: dict, cold_s: float | None, steady: Sequence[float]) -> tuple[float | None, str | None]:
    """The base side's compile seconds and their kind, as :func:`diffperf.harness.compile_figure` makes the head's."""
    ahead = (base_stats.get("compile_info") or {}).get("ahead_of_time_compile_s")
    if ahead is not None:
        return float(ahead), "ahead-of-time"
    if not base_stats.get("compiles") or cold_s is None or not steady:
        return None, None
    return max(0.0, float(cold_s) - float(np.median(steady))), "cold-start-excess"


@dataclasses.dataclass
class Paired:
    """One case measured in pairs against the base worker (what :func:`pair_up` returns)."""

    pairs: PairsResult
    seed: int
    head_warm: list[float]
    base_warm: list[float]
    head_peak: Any
    head_memory_kind: str | None
    base_built: dict
    base_stats: dict
    comparison: PairedComparison  # the verdict: the first pair's own, or across process pairs (ab_replicate)
    blocks: list = dataclasses.field(default_factory=list)  # ab_replicate.Block per process pair, when replicated
    replication_stopped: str | None = None
    base_compile: tuple = (None, None)  # the base worker's compile seconds and their kind (_compile_figure)


def pair_up(ab: AbSession, prepared, *, test_id: str, rounds: int, warmup_rounds: int, max_time_s: float,
            tolerance: float, alpha: float, inject_slowdown: float = 0.0, process_cv: float = PROCESS_CV,
            min_processes: int = 0, memory_tolerance: float | None = None,
            compile_tolerance: float | None = None, offset=None) -> Paired:
    """Build ``prepared``'s case in the base worker, warm both sides and take the pairs; the base pipeline is
    released afterwards. With ``--perf-ab-processes`` above 1, further process pairs follow
    (:func:`diffperf.ab_replicate.replicate`, at least ``min_processes`` pairs in all, within
    ``--perf-ab-processes``; more while a peak-memory or compile-time figure is beyond ``memory_tolerance`` /
    ``compile_tolerance`` in fewer than two fresh pairs) and the verdict is theirs together; ``offset`` (the
    case's stored A/A first-pair offsets, :mod:`diffperf.ab_offsets`) lets the first pair settle alone.
    Raises :class:`AbDoesNotFit` (skip the case) or :class:`AbError`."""
    from diffperf import harness
    from diffperf.timing import timed_call

    case, runner = prepared.case, prepared.runner
    check_fits(case, prepared.cold_peak_bytes)
    base_built = ab.build(case)
    worker = ab.worker
    try:
        call = harness.slowed(runner.generate, inject_slowdown, runner.synchronize)

        def head_round() -> float:
            return timed_call(call, runner.synchronize).seconds

        def base_round() -> float:
            return float(worker.request("round")["seconds"])

        seed = order_seed(ab.settings.seed, test_id)
        head_warm, base_warm = [], []
        for _ in range(warmup_rounds):
            head_warm.append(head_round())
            base_warm.append(base_round())
        runner.memory.reset()
        worker.request("reset_memory")
        done = None
        if ab.settings.processes > 1:
            from diffperf.ab_replicate import first_pair_done

            done = functools.partial(first_pair_done, offset=offset)
        with _progress(f"{case.id}: A/B pairs (head and base in random order)"):
            res = run_pairs(head_round, base_round, min_pairs=rounds, warmup_rounds=0, max_time_s=max_time_s,
                            tolerance=tolerance, alpha=alpha, seed=seed,
                            compare=functools.partial(paired_compare, process_cv=process_cv), done=done)
        head_peak, head_kind = runner.memory.peak_bytes(), runner.memory.kind
        base_stats = worker.request("stats")
    finally:
        if worker.proc.poll() is None and not worker.busy:  # a worker interrupted mid-request is killed later
            try:
                worker.request("release")
            except AbWorkerError:
                pass
    base_compile = _compile_figure(base_stats, base_built.get("cold_start_s"), res.base)
    if ab.settings.processes <= 1:
        return Paired(res, seed, head_warm, base_warm, head_peak, head_kind, base_built, base_stats, res.comparison,
                      base_compile=base_compile)
    from diffperf import ab_replicate

    first = ab_replicate.Block(1, res, seed, os.getpid(), worker.proc.pid, None, base_built.get("builder_file"))
    info = runner.compile_info() if hasattr(runner, "compile_info") else {}
    head_compile, head_compile_kind = harness.compile_figure(prepared.cold_start_s, float(np.median(res.head)), info,
                                                             harness.case_compiles(case, info))
    unlike = first_pipeline_differs(prepared.first_in_process, base_built.get("first_in_process"))
    figures = {"memory": None if unlike else {"head": head_peak, "base": base_stats.get("steady_peak_bytes"),
                                              "kind_head": head_kind, "kind_base": base_stats.get("memory_kind"),
                                              "aa_low": offset.memory_range[0] if offset and offset.memory_range else None},
               "compile": {"head": head_compile, "base": base_compile[0], "kind_head": head_compile_kind,
                           "kind_base": base_compile[1]}}
    blocks, cmp, stopped = ab_replicate.replicate(
        ab, prepared, first, test_id=test_id, rounds=rounds, warmup_rounds=warmup_rounds, max_time_s=max_time_s,
        tolerance=tolerance, alpha=alpha, inject_slowdown=inject_slowdown, process_cv=process_cv,
        min_processes=min_processes, first_figures=figures,
        tolerances={"memory": memory_tolerance, "compile": compile_tolerance}, offset=offset)
    return Paired(res, seed, head_warm, base_warm, head_peak, head_kind, base_built, base_stats, cmp, blocks, stopped,
                  base_compile)


def measure(ab: AbSession, prepared, benchmark, *, test_id: str, rounds: int, warmup_rounds: int, max_time_s: float,
            tolerance: float, alpha: float, memory_tolerance: float, compile_tolerance: float,
            inject_slowdown: float = 0.0, breakdown_rounds: int = 3,
            process_cv: float = PROCESS_CV, offset=None, offset_note: str | None = None) -> tuple[dict, AbOutcome]:
    """Measure ``prepared`` (the head) against the base worker in pairs; ``(head record, A/B outcome)``.

    The record is the head's, as :func:`diffperf.harness.record` makes it from the head's paired rounds,
    with ``record["ab"]`` added. Raises :class:`AbDoesNotFit` (skip the case) or :class:`AbError`.
    """
    from diffperf import harness
    from diffperf.hardware import software_versions

    runner = prepared.runner
    got = pair_up(ab, prepared, test_id=test_id, rounds=rounds, warmup_rounds=warmup_rounds, max_time_s=max_time_s,
                  tolerance=tolerance, alpha=alpha, inject_slowdown=inject_slowdown, process_cv=process_cv,
                  memory_tolerance=memory_tolerance, compile_tolerance=compile_tolerance, offset=offset)
    res, seed, base_built, base_stats = got.pairs, got.seed, got.base_built, got.base_stats
    if benchmark is not None:
        _record_rounds(benchmark, res.head)
    breakdowns = [runner.generate_instrumented()[1].as_dict() for _ in range(breakdown_rounds)]
    rec = harness.record(prepared, res.head, got.head_peak, breakdowns, steady_memory_kind=got.head_memory_kind)
    head_side = {"versions": software_versions(), "python": _head_python(), "cold_start_s": prepared.cold_start_s,
                 "build_s": prepared.build_s, "compile_s": rec.get("compile_s"), "compile_kind": rec.get("compile_kind"),
                 "peak_memory_bytes": rec["peak_memory_bytes"], "memory_kind": rec.get("memory_kind"),
                 "first_in_process": prepared.first_in_process, "ran_before": list(prepared.ran_before),
                 "warmup_s": got.head_warm, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    hello = ab.hello or {}
    base_compile, base_compile_kind = got.base_compile
    base_side = {"versions": hello.get("versions"), "python": hello.get("python"),
                 "cold_start_s": base_built.get("cold_start_s"), "build_s": base_built.get("build_s"),
                 "compile_s": base_compile, "compile_kind": base_compile_kind,
                 "peak_memory_bytes": {"cold": base_built.get("cold_peak_bytes"),
                                       "steady": base_stats.get("steady_peak_bytes")},
                 "memory_kind": base_stats.get("memory_kind"), "first_in_process": base_built.get("first_in_process"),
                 "warmup_s": got.base_warm,
                 "cuda_visible_devices": hello.get("cuda_visible_devices"), "device_env": hello.get("device_env"),
                 "diffperf_file": hello.get("diffperf_file"), "builder_file": base_built.get("builder_file")}
    if base_built.get("built_beside_head"):  # the two builds ran at once: their build_s carry the contention
        head_side["built_beside_other_side"] = base_side["built_beside_other_side"] = True
    cmp = got.comparison
    memory_pairs = [b.memory for b in got.blocks[1:] if b.memory]
    compile_pairs = [b.compile for b in got.blocks[1:] if b.compile]
    outcome = judge(test_id, head_side, base_side, cmp, memory_tolerance, compile_tolerance, memory_pairs,
                    compile_pairs, memory_offset=offset, offset_note=offset_note, stopped=got.replication_stopped)
    rec["ab"] = {
        "verdict": cmp.verdict, "ratio": cmp.ratio, "ci": [cmp.ci_low, cmp.ci_high], "confidence": cmp.confidence,
        "p": cmp.p_value, "p_slower": cmp.p_slower, "p_faster": cmp.p_faster, "pairs": cmp.pairs,
        "order": res.order, "order_seed": seed, "min_detectable_slowdown": cmp.min_detectable,
        "decided": cmp.decided, "tolerance": tolerance, "alpha": alpha, "process_cv": process_cv,
        "pairs_seconds": sum(b.pairs.seconds for b in got.blocks) if got.blocks else res.seconds,
        "head_samples_s": res.head, "base_samples_s": res.base,
        "processes": cmp.processes, "blocks": [b.as_dict() for b in got.blocks],
        "first_pair": {"ratio": res.comparison.ratio, "pairs_se": res.comparison.pairs_se,
                       "pairs": res.comparison.pairs},
        "offset_prior": (offset.as_dict() | {"settled_first_pair": bool(cmp.offset_source)}
                         if offset is not None else None), "offset_note": offset_note,
        "inject_slowdown": inject_slowdown,
        "replication_stopped": got.replication_stopped,
        "head_commit": ab.head_commit, "base_commit": ab.base_commit,
        "head": head_side, "base": base_side, **outcome.info, "message": outcome.message,
    }
    return rec, outcome


def _progress(what: str):
    from diffperf import progress

    return progress.step(what)
