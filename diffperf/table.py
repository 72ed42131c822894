"""The terminal results table of a run, one line per measured case."""

from __future__ import annotations

from diffperf import published


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _drift(gate: dict) -> str:
    """Between-run CV of the baseline history and the smallest regression it can flag (``*``: within-run rule)."""
    flag = gate.get("min_flaggable_regression")
    if flag is None:
        return "-"
    cv = gate.get("between_run_cv")
    cv_s = "?" if cv is None else f"{cv * 100:.1f}%"
    star = "" if gate.get("gate_rule") == "between-run" else "*"
    flag_s = f"+{flag * 100:.0f}%" if flag == flag and flag != float("inf") else "n/a"
    return f"{cv_s} / {flag_s}{star}"


def ab_cell(ab: dict | None) -> str:
    """``verdict ratio [low, high] n=pairs`` of an A/B record (``-`` without one), ``, K proc`` when the pairs
    came from K process pairs, ``, 1 proc, A/A offsets`` when one settled with the case's stored A/A offsets."""
    if not ab:
        return "-"
    if ab.get("verdict") == "error" or ab.get("ratio") is None:
        return str(ab.get("verdict", "-"))
    low, high = ab["ci"]
    procs = f", {ab['processes']} proc" if (ab.get("processes") or 1) > 1 else ""
    if (ab.get("offset_prior") or {}).get("settled_first_pair"):
        procs = ", 1 proc, A/A offsets"
    return f"{ab['verdict']} {ab['ratio']:.3f} [{low:.3f}, {high:.3f}] n={ab['pairs']}{procs}"


def _gate_cell(gate: dict) -> str:
    """The gate's latency verdict; a flag re-measured by A/B (``--perf-confirm ab``) is marked with its outcome."""
    outcome = (gate.get("confirmation") or {}).get("outcome")
    if outcome == "machine drift":
        return f"{gate.get('verdict')} (drift)†"
    if outcome == "confirmed":
        return "regressed (A/B)†"
    if outcome == "not confirmable":
        return "regressed (unconfirmed)"
    return gate.get("verdict", "-")


def results_table(records: list[tuple[str, dict]], published_path=None) -> list[str]:
    """The terminal table of this run's results, one line per case, then the published figures its cases
    match (:mod:`diffperf.published`), or why none applies."""
    header = ("case", "median", "cv", "cold start", "compile", "peak mem", "img/s", "fidelity", "gate",
              "run-to-run cv / flags from")
    with_ab = any(r.get("ab") for _nodeid, r in records)
    if with_ab:
        header += ("A/B",)
    rows = []
    for _nodeid, r in records:
        fid = r.get("fidelity") or {}
        if "error" in fid:
            fid_s = "NON-FINITE"
        elif fid:
            psnr = fid.get("psnr_db")
            fid_s = ("identical" if fid.get("identical") else f"{psnr:.1f} dB") + ("" if fid.get("ok") else " FAIL")
        else:
            fid_s = "-"
        gate = _gate_cell(r.get("gate") or {})
        rows.append((
            f"{r['framework']}-{r['device']}-{r['case']['id']}", _fmt_s(r["median_s"]), f"{r['cv'] * 100:.1f}%",
            _fmt_s(r["cold_start_s"]), _fmt_s(r.get("compile_s")), _fmt_bytes(r["peak_memory_bytes"].get("steady")),
            f"{r['images_per_s']:.2f}", fid_s, gate, _drift(r.get("gate") or {}),
        ) + ((ab_cell(r.get("ab")),) if with_ab else ()))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    out = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
    if any(row[9].endswith("*") for row in rows):
        out.append("* baseline history under 3 runs: the verdict ignores between-run drift (within-run noise only)")
    if any(row[8].endswith("†") for row in rows):
        out.append("† the gate flagged this case (latency, peak memory or compile time); an interleaved A/B against "
                   "the baseline's commit did not confirm it (machine drift) or did (regressed); see the test's gate "
                   "record")
    measured = [(f"{r['framework']}-{r['device']}-{r['case']['id']}", r, r["median_s"]) for _n, r in records]
    return out + [""] + published.run_figures(measured, path=published_path).text_lines()
