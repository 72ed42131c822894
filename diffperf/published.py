"""Published figures beside measured ones: ``baselines/published.json``, the seed write-ups' tables as data.

Each table holds one source's figures (file and table, hardware, conditions, the recipe tag each figure
corresponds to, seconds) and the recipe its speed-ups are taken over (the ladder's first step). A measured
case matches a figure when its framework, recipe and conditions (preset, resolution, steps, batch size,
images) are the figure's and its hardware model is the figure's (:func:`hardware_key`). Reports then show the
published figure, the measured one, their ratio, and each recipe's speed-up over the table's first step,
published and measured (the fair comparison across software versions). Published figures are context for a
reader, never a pass/fail gate: drivers, library versions and clocks differ.

Note: hardware is compared on a normalized key. GPU names (``NVIDIA A100-SXM4-80GB``, the ``nvidia-smi``
name in ``machine_info``, or its slug in a hardware id, ``cuda-1x-nvidia-a100-sxm4-80gb``) and the tables'
``A100 80GB`` are split into words; vendor words (NVIDIA, Tesla, GeForce, Quadro) and form-factor words
(SXM4, PCIe, HBM3, NVL) are dropped; ``<n>GB`` is the memory; the rest is the model. Model and memory must
both match (a table that states no memory matches every memory size). TPU types (``v5litepod-8``, ``TPU v5
lite``, ``TPU v5e``) reduce to their generation (``v5e``; "lite" is the v5e); the chip count is not compared.
CPU cases never match: no seed publishes a CPU figure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from diffperf.fileio import read_json

SCHEMA = 1
SCHEMA_KEY = "diffperf_published_schema"
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "baselines" / "published.json"
CONDITION_KEYS = ("preset", "height", "width", "steps", "batch_size", "images")
CONTEXT_NOTE = "context, not a gate: other drivers, library versions and clocks"
NONE_APPLIES = "no published figure applies"

_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO"}
_FORM_FACTOR_RE = re.compile(r"^(SXM\d*|PCIE|HBM\d*E?|NVL)$")
_MEMORY_RE = re.compile(r"^(\d+)GB$")
_TPU_RE = re.compile(r"v(\d+)\s*(lite(?:pod)?|[a-z])?", re.IGNORECASE)


class PublishedError(Exception):
    """A published-figures file that cannot be used; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Figure:
    """One published figure with everything it was measured under."""

    table: str  # the table's id
    source_file: str
    source_table: str
    framework: str
    hardware: str  # as the table writes it, e.g. "A100 80GB"
    hardware_key: tuple
    conditions: tuple  # values of CONDITION_KEYS, in order
    recipe: str
    seconds: float
    speedup_over: str  # the recipe of the table's first step
    as_published: str = ""

    @property
    def device(self) -> str:
        return "tpu" if self.hardware_key[0] == "tpu" else "cuda"

    def conditions_text(self) -> str:
        c = dict(zip(CONDITION_KEYS, self.conditions))
        return (f"{self.framework} {c['preset']} {c['height']}x{c['width']}, {c['steps']} steps, "
                f"batch {c['batch_size']}, {c['images']} images")


@dataclasses.dataclass
class Published:
    """The figures of one file, and the file they came from."""

    path: Path
    figures: list[Figure]

    def table_figure(self, table: str, recipe: str) -> Figure | None:
        return next((f for f in self.figures if f.table == table and f.recipe == recipe), None)

    def hardware_list(self) -> list[str]:
        return list(dict.fromkeys(hardware_text(f.hardware_key) for f in self.figures))


# ------------------------------------------------------------------------------------------------ hardware


def hardware_key(name: str) -> tuple | None:
    """The comparable identity of a GPU or TPU name (see the module's note); ``None`` when there is none.

    ``("gpu", model, memory_gb or None)`` or ``("tpu", generation)``.
    """
    if not isinstance(name, str) or not name.strip():
        return None
    text = name.strip()
    lowered = text.lower()
    if lowered.startswith("cuda-"):  # a hardware id: cuda-<n>x-<gpu name slug>
        text = re.sub(r"^cuda-(\d+x-)?", "", lowered)
    elif lowered.startswith("tpu") or re.match(r"^v\d+", lowered):
        m = _TPU_RE.search(re.sub(r"^tpu[-\s]*", "", lowered))
        if not m:
            return None
        suffix = (m.group(2) or "").lower()
        suffix = "e" if suffix.startswith("lite") else suffix
        return ("tpu", f"v{m.group(1)}{suffix}")
    elif lowered.startswith("cpu-") or lowered == "cpu":
        return None
    memory, words = None, []
    for word in re.split(r"[^A-Za-z0-9]+", text.upper()):
        if not word or word in _VENDOR_WORDS or _FORM_FACTOR_RE.match(word):
            continue
        m = _MEMORY_RE.match(word)
        if m:
            memory = int(m.group(1))
        else:
            words.append(word)
    if not words or not any(ch.isdigit() for ch in "".join(words)):
        return None
    return ("gpu", " ".join(words), memory)


def hardware_text(key: tuple | None) -> str:
    if not key:
        return "unknown"
    if key[0] == "tpu":
        return f"TPU {key[1]}"
    return key[1] + (f" {key[2]}GB" if key[2] else "")


def hardware_matches(figure_key: tuple, run_key: tuple | None) -> bool:
    """Whether a run's hardware is a figure's (a figure without a memory size matches any)."""
    if run_key is None or figure_key[0] != run_key[0]:
        return False
    if figure_key[0] == "tpu":
        return figure_key[1] == run_key[1]
    return figure_key[1] == run_key[1] and (figure_key[2] is None or figure_key[2] == run_key[2])


# ------------------------------------------------------------------------------------------------ loading


def _fail(path: Path, where: str, problem: str) -> PublishedError:
    return PublishedError(f"published figures {path}: {where}: {problem}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _text(obj: dict, key: str, path: Path, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, where, f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _conditions(raw: Any, path: Path, where: str) -> tuple:
    from diffperf.presets import get_preset

    if not isinstance(raw, dict):
        raise _fail(path, where, f"'conditions' must be an object with {', '.join(CONDITION_KEYS)}")
    missing = [k for k in CONDITION_KEYS if k not in raw]
    extra = sorted(set(raw) - set(CONDITION_KEYS))
    if missing or extra:
        raise _fail(path, where, f"'conditions' lacks {missing}" if missing else f"'conditions' has unknown keys {extra}")
    try:
        get_preset(raw["preset"])
    except Exception as exc:  # noqa: BLE001 - the preset module's own message names the known presets
        raise _fail(path, where, f"conditions: {exc}") from None
    for k in CONDITION_KEYS[1:]:
        if not _positive_int(raw[k]):
            raise _fail(path, where, f"conditions: {k!r} must be a positive integer, got {raw[k]!r}")
    if raw["images"] % raw["batch_size"]:
        raise _fail(path, where, f"conditions: {raw['images']} images is not a multiple of batch size {raw['batch_size']}")
    return tuple(raw[k] for k in CONDITION_KEYS)


def _recipe_tag(framework: str, tag: Any, path: Path, where: str) -> str:
    from diffperf.cases import RecipeError, framework_spec

    if not isinstance(tag, str):
        raise _fail(path, where, f"'recipe' must be a recipe tag string, got {tag!r}")
    try:
        return framework_spec(framework).recipe_cls.from_tag(tag).tag()
    except RecipeError as exc:
        raise _fail(path, where, f"recipe: {exc}") from None


def parse(data: Any, path: Path) -> Published:
    """Validate the contents of a published-figures file; :class:`PublishedError` names the file and entry."""
    from diffperf.cases import FRAMEWORKS

    if not isinstance(data, dict) or data.get(SCHEMA_KEY) != SCHEMA:
        got = data.get(SCHEMA_KEY) if isinstance(data, dict) else None
        raise PublishedError(f"published figures {path}: not a schema-{SCHEMA} published-figures file "
                             f"({SCHEMA_KEY!r} is {got!r})")
    tables = data.get("tables")
    if not isinstance(tables, list) or not tables:
        raise PublishedError(f"published figures {path}: 'tables' must be a non-empty list")
    figures: list[Figure] = []
    seen_ids: set[str] = set()
    for t_index, table in enumerate(tables):
        where = f"table #{t_index}"
        if not isinstance(table, dict):
            raise _fail(path, where, "must be an object")
        tid = _text(table, "id", path, where)
        where = f"table {tid!r}"
        if tid in seen_ids:
            raise _fail(path, where, "the id is used twice")
        seen_ids.add(tid)
        source = table.get("source")
        if not isinstance(source, dict):
            raise _fail(path, where, "'source' must be an object with 'file' and 'table'")
        src_file, src_table = _text(source, "file", path, where + " source"), _text(source, "table", path, where + " source")
        framework = _text(table, "framework", path, where)
        if framework not in FRAMEWORKS:
            raise _fail(path, where, f"unknown framework {framework!r}; known: {', '.join(FRAMEWORKS)}")
        hardware = _text(table, "hardware", path, where)
        key = hardware_key(hardware)
        if key is None:
            raise _fail(path, where, f"hardware {hardware!r} names no GPU model (e.g. 'A100 80GB') or TPU type "
                                     "(e.g. 'TPU v5e')")
        conditions = _conditions(table.get("conditions"), path, where)
        raw_figures = table.get("figures")
        if not isinstance(raw_figures, list) or not raw_figures:
            raise _fail(path, where, "'figures' must be a non-empty list")
        first = _recipe_tag(framework, table.get("speedup_over"), path, where + " speedup_over")
        recipes: list[str] = []
        for f_index, fig in enumerate(raw_figures):
            fwhere = f"{where} figure #{f_index}"
            if not isinstance(fig, dict):
                raise _fail(path, fwhere, "must be an object with 'recipe' and 'seconds'")
            recipe = _recipe_tag(framework, fig.get("recipe"), path, fwhere)
            fwhere = f"{where} figure #{f_index} ({recipe})"
            if recipe in recipes:
                raise _fail(path, fwhere, "the recipe appears twice in the table")
            seconds = fig.get("seconds")
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                    or seconds <= 0:
                raise _fail(path, fwhere, f"'seconds' must be a positive number, got {seconds!r}")
            recipes.append(recipe)
            figures.append(Figure(tid, src_file, src_table, framework, hardware, key, conditions, recipe,
                                  float(seconds), first, str(fig.get("as_published") or "")))
        if first not in recipes:
            raise _fail(path, where, f"speedup_over {first!r} is not one of the table's recipes ({', '.join(recipes)})")
    return Published(path, figures)


def load(path: str | os.PathLike[str] | None = None) -> Published:
    """Read and validate ``baselines/published.json`` (or ``path``)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    return parse(read_json(path, "published figures", PublishedError), path)


# ------------------------------------------------------------------------------------------------ matching


@dataclasses.dataclass
class Match:
    """A measured case beside its published figure."""

    test: str
    figure: Figure
    measured_s: float
    published_speedup: float | None = None
    measured_speedup: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        """Measured over published seconds (above 1: slower than published)."""
        return self.measured_s / self.figure.seconds


def record_hardware_key(record: dict, machine_info: dict | None = None) -> tuple | None:
    """The hardware key of one measured case: machine_info's GPU models or TPU type, else its hardware id."""
    device = record.get("device") or (record.get("case") or {}).get("device")
    mi = machine_info or {}
    names: list[str] = []
    if device == "cuda":
        names = list((mi.get("gpu") or {}).get("models") or [])
    elif device == "tpu" and mi.get("tpu"):
        names = [str(mi["tpu"])]
    elif device != "tpu":
        return None
    if not names and isinstance(record.get("hardware_id"), str):
        names = [record["hardware_id"]]
    keys = {hardware_key(n) for n in names} - {None}
    return keys.pop() if len(keys) == 1 else None  # several GPU models: which one ran it is unknown


def record_conditions(record: dict) -> tuple | None:
    case = record.get("case") or {}
    try:
        devices = int((record.get("compile_info") or {}).get("devices") or 1)
        return (case["preset"], int(case["height"]), int(case["width"]), int(case["steps"]),
                int(case["batch_size"]), int(case["batch_size"]) * devices)
    except (KeyError, TypeError, ValueError):
        return None


def _framework(record: dict) -> str | None:
    return record.get("framework") or (record.get("case") or {}).get("framework")


def matches(published: Published, records: Iterable[tuple[str, dict, float]],
            machine_info: dict | None = None) -> list[Match]:
    """Each ``(test, record, measured seconds)`` beside the published figure it matches, in the records' order."""
    items = [(test, rec, secs, record_hardware_key(rec, machine_info), record_conditions(rec))
             for test, rec, secs in records]
    out = []
    for test, rec, secs, key, cond in items:
        recipe = (rec.get("case") or {}).get("recipe")
        for fig in published.figures:  # two tables may publish the same case: one match each
            if not (fig.framework == _framework(rec) and fig.recipe == recipe and fig.conditions == cond
                    and hardware_matches(fig.hardware_key, key)):
                continue
            m = Match(test, fig, secs)
            first = published.table_figure(fig.table, fig.speedup_over)
            m.published_speedup = first.seconds / fig.seconds
            ref = next((s for _t, r, s, k, c in items if k == key and c == cond and _framework(r) == fig.framework
                        and (r.get("case") or {}).get("recipe") == fig.speedup_over), None)
            if ref is not None:
                m.measured_speedup = ref / secs
            else:
                m.note = f"{fig.speedup_over} not measured in this run: no measured speed-up"
            out.append(m)
    return out


def none_applies(published: Published, records: Sequence[tuple[str, dict, float]],
                 machine_info: dict | None = None) -> str:
    """Why no published figure applies to these records (their hardware, or their conditions)."""
    keys = {record_hardware_key(rec, machine_info) for _t, rec, _s in records} - {None}
    same_hw = [f for f in published.figures if any(hardware_matches(f.hardware_key, k) for k in keys)]
    if same_hw:
        where = "; ".join(dict.fromkeys(f"{f.hardware}: {f.conditions_text()}" for f in same_hw))
        return (f"{NONE_APPLIES}: no case of this run ran at a published figure's conditions and recipe "
                f"({where})")
    devices = sorted({str(rec.get("device")) for _t, rec, _s in records}) or ["none"]
    ran = ", ".join(hardware_text(k) for k in keys) or "device " + "/".join(devices)
    return f"{NONE_APPLIES} to this hardware ({ran}); figures are published for {', '.join(published.hardware_list())}"


# ------------------------------------------------------------------------------------------------ rendering

HEADER = ["test", "source", "hardware", "published", "measured", "measured/published", "speed-up over first step",
          "published speed-up", "measured speed-up"]


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _s(value: float) -> str:
    return f"{value:.3g} s" if value >= 1 else f"{value * 1000:.3g} ms"


def _measured(label: str) -> str:
    return "measured" if label == "measured" else f"measured ({label})"


def cells(m: Match) -> list[str]:
    f = m.figure
    return [m.test, f"{f.source_file}: {f.table}", f.hardware, _s(f.seconds), _s(m.measured_s), f"{m.ratio:.2f}",
            f.speedup_over, _x(m.published_speedup), _x(m.measured_speedup)]


def text_lines(published: Published, found: Sequence[Match], records: Sequence[tuple[str, dict, float]],
               machine_info: dict | None = None, label: str = "measured") -> list[str]:
    """Terminal lines: a small table of the matches, or why none applies."""
    title = f"published figures ({published.path.name}; {CONTEXT_NOTE}):"
    if not found:
        return [f"{title} {none_applies(published, records, machine_info)}"]
    header = [_measured(label) if h == "measured" else h for h in HEADER if h != "source"]
    body = [[c for i, c in enumerate(cells(m)) if i != 1] for m in found]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    lines = [title, fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in body)]
    lines += [f"  {m.test}: {m.note}" for m in found if m.note]
    return lines


def markdown_lines(published: Published, found: Sequence[Match], records: Sequence[tuple[str, dict, float]],
                   machine_info: dict | None = None, label: str = "measured") -> list[str]:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = ["", f"#### Published figures (`{published.path.name}`; {CONTEXT_NOTE})", ""]
    if not found:
        return out + [esc(none_applies(published, records, machine_info)) + "."]
    header = [_measured(label) if h == "measured" else h for h in HEADER]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in found:
        c = cells(m)
        c[0], c[6] = f"`{c[0]}`", f"`{c[6]}`"
        out.append("| " + " | ".join(esc(x) for x in c) + " |")
    out += [f"- `{m.test}`: {esc(m.note)}" for m in found if m.note]
    return out


def html_section(published: Published, found: Sequence[Match], records: Sequence[tuple[str, dict, float]],
                 machine_info: dict | None = None, label: str = "measured") -> str:
    import html

    e = html.escape
    head = f"<h2>Published figures</h2><p>{e(CONTEXT_NOTE.capitalize())} (<code>{e(published.path.name)}</code>).</p>"
    if not found:
        return head + f"<p class='published-none'>{e(none_applies(published, records, machine_info))}.</p>"
    header = [_measured(label) if h == "measured" else h for h in HEADER]
    rows = "\n".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells(m)) + "</tr>" for m in found)
    notes = "".join(f"<li>{e(m.test)}: {e(m.note)}</li>" for m in found if m.note)
    return (head + "<table class='published'><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + f"</tr>\n{rows}</table>"
            + (f"<ul>{notes}</ul>" if notes else ""))


# ------------------------------------------------------------------------------------------------ one run


def _median(bench: dict, record: dict) -> float | None:
    samples = record.get("samples_s")
    if isinstance(samples, list) and samples:
        import statistics

        return float(statistics.median(samples))
    value = (bench.get("stats") or {}).get("median")
    return float(value) if isinstance(value, (int, float)) else None


def saved_run_records(data: dict) -> list[tuple[str, dict, float]]:
    """``(test, diffperf record, median seconds)`` of each diffperf test in a pytest-benchmark saved run."""
    out = []
    for bench in data.get("benchmarks") or []:
        rec = bench.get("extra_info") or {}
        if "diffperf_schema" in rec:
            median = _median(bench, rec)
            if median:
                out.append((bench.get("fullname") or bench.get("name") or "?", rec, median))
    return out


@dataclasses.dataclass
class RunFigures:
    """One run's cases beside the published figures, ready to render (or the reason the file was not read)."""

    records: list[tuple[str, dict, float]]
    machine_info: dict | None = None
    label: str = "measured"
    published: Published | None = None
    found: list[Match] = dataclasses.field(default_factory=list)
    error: str | None = None

    def text_lines(self) -> list[str]:
        if self.error:
            return [f"published figures: not shown: {self.error}"]
        return text_lines(self.published, self.found, self.records, self.machine_info, self.label)

    def markdown_lines(self) -> list[str]:
        if self.error:
            return ["", f"published figures: not shown: {self.error}"]
        return markdown_lines(self.published, self.found, self.records, self.machine_info, self.label)

    def html_section(self) -> str:
        import html

        if self.error:
            return f"<h2>Published figures</h2><p>not shown: {html.escape(self.error)}</p>"
        return html_section(self.published, self.found, self.records, self.machine_info, self.label)


def run_figures(records: Sequence[tuple[str, dict, float]], machine_info: dict | None = None,
                label: str = "measured", path: str | os.PathLike[str] | None = None) -> RunFigures:
    """Match ``records`` against the published file; a file that does not load is reported, not raised.

    Note: a report is not a gate, so an unreadable ``published.json`` (its error names the file and entry)
    becomes one line of the report instead of taking the results table or ``compare`` down with it;
    ``tests/test_published.py`` validates the repository's file.
    """
    out = RunFigures(list(records), machine_info, label)
    try:
        out.published = load(path)
    except PublishedError as exc:
        out.error = str(exc)
        return out
    out.found = matches(out.published, out.records, machine_info)
    return out
