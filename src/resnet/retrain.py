"""``python -m resnet.retrain --base REF [-S key=value ...]``: what CI does when the recipe changes.

1. Reads ``params.yaml`` at the git ref ``REF`` (``git show``) and in the workspace.
2. Runs the pipeline: ``dvc repro`` (only the stages DVC finds stale), or
   ``dvc exp run -S ...`` when overrides are given (the overrides are written to
   params.yaml, as ``dvc exp run`` always does).
3. Prints a markdown report: the parameters that differ from ``REF`` (old → new), the
   metrics of ``REF`` (``metrics/*.json`` as committed there) against the new ones,
   which stages ran, and what the register stage did with the new model. A ref
   without metrics (the first run) shows "—" for the old values.

``--report PATH`` also writes the report to a file (the GitHub workflow appends it to
the job summary and posts it on the pull request); ``--plots-dir DIR`` renders
``dvc plots diff REF`` there. The exit status is non-zero when the pipeline fails; the
report is written anyway and says so.

The diffing and formatting are pure functions (unit-tested without git or DVC); only
:func:`git_show`, :func:`resolve_ref`, :func:`run_pipeline` and :func:`plots_diff`
start processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from resnet.utils import PipelineError, flatten, setup_logging

__all__ = [
    "MISSING",
    "RetrainError",
    "ParamChange",
    "MetricRow",
    "StageLog",
    "RunResult",
    "Report",
    "flatten",
    "diff_params",
    "numeric_metrics",
    "diff_metrics",
    "metric_files",
    "stage_names",
    "parse_repro_output",
    "parse_overrides",
    "redact",
    "format_report",
    "build_report",
    "git_show",
    "resolve_ref",
    "run_pipeline",
    "plots_diff",
    "main",
]

log = logging.getLogger(__name__)

PARAMS_FILE: Final = "params.yaml"
PIPELINE_FILE: Final = "dvc.yaml"
REGISTER_FILE: Final = "metrics/register.json"
DASH: Final = "—"
# How much of a failed pipeline's output the report quotes.
FAILURE_TAIL_LINES: Final = 40


class _Missing:
    """A key that does not exist on one side of a diff (not the same as a YAML null)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


class RetrainError(PipelineError):
    """The retrain command cannot start: a bad ref, override or working directory."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ParamChange:
    """One parameter that differs between the base ref and the workspace."""

    key: str
    old: Any
    new: Any


@dataclass(frozen=True)
class MetricRow:
    """One numeric metric: its file, key, value at the base ref and now (either may be MISSING)."""

    file: str
    key: str
    old: float | _Missing
    new: float | _Missing

    @property
    def delta(self) -> float | None:
        """new - old when both exist."""
        if isinstance(self.old, _Missing) or isinstance(self.new, _Missing):
            return None
        return self.new - self.old


@dataclass
class StageLog:
    """What ``dvc repro`` / ``dvc exp run`` did with each stage, read from its output."""

    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)  # restored from DVC's run-cache, not run
    unchanged: list[str] = field(default_factory=list)
    experiment: str | None = None  # the name dvc exp run gave the run


@dataclass
class RunResult:
    """A pipeline run: the command, its exit status, its combined output and the stages it touched."""

    command: list[str]
    returncode: int
    output: str
    stages: StageLog


@dataclass
class Report:
    """Everything the markdown report shows."""

    base: str
    base_commit: str
    params: list[ParamChange]
    metrics: list[MetricRow]
    overrides: list[str] = field(default_factory=list)
    run: RunResult | None = None
    stage_order: list[str] = field(default_factory=list)
    registered: dict[str, Any] | None = None
    plots: str | None = None
    title: str = "Retraining report"
    redact_keys: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- pure functions


def _same(a: Any, b: Any) -> bool:
    # 5e-4 written as "5.0e-4" or 0.0005 is the same parameter; 1 and 1.0 too, True and 1 not.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def diff_params(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[ParamChange]:
    """The parameters that differ between two params.yaml mappings (nested), sorted by key.

    A key only on one side has ``MISSING`` on the other: ``old`` is None or empty when
    the base ref has no params.yaml yet.
    """
    a, b = flatten(old or {}), flatten(new or {})
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, MISSING), b.get(key, MISSING)
        if isinstance(va, _Missing) or isinstance(vb, _Missing) or not _same(va, vb):
            changes.append(ParamChange(key, va, vb))
    return changes


def numeric_metrics(obj: Any) -> dict[str, float]:
    """The numbers in a metrics JSON, flattened (``dvc metrics`` shows these; strings and booleans are left out)."""
    return {k: float(v) for k, v in flatten(obj).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def diff_metrics(old: Mapping[str, Mapping[str, float]], new: Mapping[str, Mapping[str, float]],
                 files: Sequence[str] | None = None) -> list[MetricRow]:
    """Old against new numeric metrics, per file: ``{file: {key: value}}`` on both sides.

    Rows follow ``files`` (the order dvc.yaml names them), then any other file, keys
    sorted. A metric only on one side is MISSING on the other (first run: every old
    value).
    """
    order = list(files or [])
    order += sorted((set(old) | set(new)) - set(order))
    rows = []
    for f in order:
        a, b = old.get(f, {}), new.get(f, {})
        for key in sorted(set(a) | set(b)):
            rows.append(MetricRow(f, key, a.get(key, MISSING), b.get(key, MISSING)))
    return rows


def _stages(pipeline: Mapping[str, Any] | None) -> Mapping[str, Any]:
    stages = (pipeline or {}).get("stages") or {}
    return stages if isinstance(stages, Mapping) else {}


def stage_names(pipeline: Mapping[str, Any] | None) -> list[str]:
    """The stage names of a parsed dvc.yaml, in file order."""
    return list(_stages(pipeline))


def metric_files(pipeline: Mapping[str, Any] | None) -> list[str]:
    """The metrics files a parsed dvc.yaml declares (stage ``metrics:`` and top-level ``metrics:``)."""
    found: list[str] = []

    def add(entries: Any) -> None:
        for entry in entries or []:
            # An entry is a path or {path: {cache: false, ...}}.
            names = [entry] if isinstance(entry, str) else list(entry) if isinstance(entry, Mapping) else []
            for name in names:
                if name not in found:
                    found.append(str(name))

    for stage in _stages(pipeline).values():
        if isinstance(stage, Mapping):
            add(stage.get("metrics"))
    add((pipeline or {}).get("metrics"))
    return found


_RAN = re.compile(r"^Running stage '([^']+)'")
_UNCHANGED = re.compile(r"^(?:Stage )?'([^']+)' didn't change, skipping")
_CACHED = re.compile(r"^Stage '([^']+)' is cached - skipping run")
_EXPERIMENT = re.compile(r"^Ran experiment\(s\): (.+)$")


def parse_repro_output(text: str) -> StageLog:
    """Which stages ran, came from the run-cache, or were up to date, from ``dvc repro``'s log lines
    (and the experiment's name, from ``dvc exp run``'s)."""
    result = StageLog()
    for line in text.splitlines():
        line = line.strip()
        exp = _EXPERIMENT.match(line)
        if exp:
            result.experiment = exp.group(1).strip()
            continue
        for pattern, bucket in ((_RAN, result.ran), (_CACHED, result.cached), (_UNCHANGED, result.unchanged)):
            m = pattern.match(line)
            if m:
                # "dvc.yaml:train" when several dvc.yaml files exist; the stage name is enough here.
                name = m.group(1).rsplit(":", 1)[-1]
                if name not in bucket:
                    bucket.append(name)
                break
    return result


# [file:]key=value, dvc's (hydra's) grammar: also +key=value (add), ++key=value (add or
# set) and ~key (delete).
_KEY = r"[A-Za-z_][\w-]*(?:\.[\w-]+)*"
_OVERRIDE = re.compile(rf"^(?:[\w./-]+:)?(?:(?:\+\+|\+)?{_KEY}=|~{_KEY}(?:=|$))")


def parse_overrides(values: Iterable[str]) -> list[str]:
    """Check ``-S`` overrides (``key=value``, dvc's syntax) before any work; return them unchanged.

    Raises RetrainError naming the bad value and the expected form.
    """
    out = []
    for value in values:
        if not _OVERRIDE.match(value):
            raise RetrainError(f"-S {value!r} is not an override; write it as key=value with the dotted "
                               f"params.yaml key, e.g. -S train.lr=0.05")
        out.append(value)
    return out


def redact(value: Any) -> Any:
    """Hide credentials in URLs (``https://user:token@host/x?sig=...``) before a value is published."""
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _cell(value: Any) -> str:
    """A value as a markdown table cell, written the way YAML would."""
    if isinstance(value, _Missing):
        return DASH
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else "`\"\"`"


def _number(value: float, sign: str = "") -> str:
    """Integers as integers; four decimals for accuracies and losses, one for throughputs and seconds."""
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):{sign}d}"
    return f"{value:{sign}.4f}" if abs(value) < 100 else f"{value:{sign}.1f}"


def _num(value: float | _Missing) -> str:
    return DASH if isinstance(value, _Missing) else _number(value)


def _delta(d: float | None) -> str:
    if d is None:
        return ""
    return "0" if d == 0 else _number(d, "+")


def _param_cell(value: Any, hide: bool) -> str:
    """A parameter value for the report: a dash when absent, stars when redacted, URLs without credentials."""
    if isinstance(value, _Missing):
        return DASH
    return "`***`" if hide else _cell(redact(value))


def _short(commit: str) -> str:
    return commit[:10] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit


def format_report(report: Report) -> str:
    """The markdown report: run status, stages, changed params, old vs new metrics, the registry."""
    lines = [f"## {report.title}", ""]
    base = f"`{report.base}`" + (f" ({_short(report.base_commit)})" if report.base_commit != report.base else "")
    lines.append(f"Compared with {base}.")
    if report.overrides:
        shown = " ".join(f"`-S {_redact_override(o, report.redact_keys)}`" for o in report.overrides)
        lines.append(f"Overrides: {shown}")
    run = report.run
    if run is None:
        lines.append("Pipeline not run (`--no-run`): the workspace as it is.")
    else:
        # The command as a user would type it: "dvc", not the venv's full path to it.
        args = run.command[1:]
        args = [_redact_override(a, report.redact_keys) if i and args[i - 1] == "-S" else a
                for i, a in enumerate(args)]
        shown = " ".join(["dvc", *args])
        outcome = "**succeeded**" if run.returncode == 0 else f"**failed** with exit status {run.returncode}"
        lines.append(f"Pipeline: {outcome} (`{shown}`).")
        if run.stages.experiment:
            lines.append(f"DVC experiment: `{run.stages.experiment}`.")
    lines.append("")

    if run is not None:
        lines += ["### Stages", "", "| stage | what happened |", "| --- | --- |"]
        seen = run.stages.ran + run.stages.cached + run.stages.unchanged
        order = report.stage_order + [s for s in seen if s not in report.stage_order]
        for stage in order:
            if stage in run.stages.ran:
                what = "**ran**"
            elif stage in run.stages.cached:
                what = "restored from the run-cache"
            elif stage in run.stages.unchanged:
                what = "unchanged, skipped"
            else:
                what = "not reached" if run.returncode else "not in the run"
            lines.append(f"| {stage} | {what} |")
        lines.append("")

    lines += ["### Parameters changed", ""]
    if report.params:
        lines += ["| parameter | old | new |", "| --- | --- | --- |"]
        for c in report.params:
            hide = c.key in report.redact_keys
            lines.append(f"| {c.key} | {_param_cell(c.old, hide)} | {_param_cell(c.new, hide)} |")
    else:
        lines.append(f"None: params.yaml is the same as at `{report.base}`.")
    lines.append("")

    lines += ["### Metrics", ""]
    if report.metrics:
        lines += ["| file | metric | old | new | change |", "| --- | --- | ---: | ---: | ---: |"]
        for r in report.metrics:
            lines.append(f"| {r.file} | {r.key} | {_num(r.old)} | {_num(r.new)} | {_delta(r.delta)} |")
        if all(isinstance(r.old, _Missing) for r in report.metrics):
            lines += ["", f"`{report.base}` has no metrics yet (first run): old values are {DASH}."]
    else:
        lines.append("No metrics files found.")
    lines.append("")

    if report.registered:
        r = report.registered
        lines += ["### Model registry", "",
                  f"`{r.get('model_name')}` version {r.get('version')} is **@{r.get('alias')}**: {r.get('reason')}.", ""]
    if report.plots:
        lines += ["### Plots", "", f"`dvc plots diff {report.base}` rendered to `{report.plots}`.", ""]
    if run is not None and run.returncode:
        tail = _scrub("\n".join(run.output.rstrip().splitlines()[-FAILURE_TAIL_LINES:]), _secrets(report))
        lines += ["### Failure", "", "<details><summary>last lines of the pipeline's output</summary>", "",
                  "```", tail.replace("```", "'''"), "```", "", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def _secrets(report: Report) -> list[str]:
    """The values of the redacted keys, wherever the report might quote them."""
    values = [c.old for c in report.params if c.key in report.redact_keys]
    values += [c.new for c in report.params if c.key in report.redact_keys]
    for o in report.overrides:
        key, _, value = o.partition("=")
        if _bare_key(key) in report.redact_keys:
            values.append(value)
    return sorted({v for v in values if isinstance(v, str) and v}, key=len, reverse=True)


_URL_CREDENTIALS = re.compile(r"(\w+://)[^/\s@]+@")


def _scrub(text: str, secrets: Sequence[str]) -> str:
    """Log text without the secret values and URL credentials it may contain."""
    for value in secrets:
        text = text.replace(value, "***")
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def _bare_key(key: str) -> str:
    """``params.yaml:++train.lr`` -> ``train.lr``."""
    return key.split(":", 1)[-1].lstrip("+~")


def _redact_override(override: str, keys: frozenset[str]) -> str:
    key, _, value = override.partition("=")
    bare = _bare_key(key)
    return f"{key}=***" if bare in keys else f"{key}={redact(value)}"


# --------------------------------------------------------------------------- git and dvc


def _tool_env() -> dict[str, str]:
    """Environment for dvc: this interpreter's bin first on PATH, since the stage commands say ``python``."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{path}" if path else bin_dir}


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def resolve_ref(ref: str, cwd: str | Path = ".") -> str:
    """The commit a git ref names; RetrainError saying how to get it when it is unknown."""
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=cwd,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RetrainError(f"cannot run git to resolve --base {ref!r}: {e}") from e
    if out.returncode != 0 or not out.stdout.strip():
        raise RetrainError(f"--base {ref!r} is not a commit in this repository; fetch it first "
                           f"(git fetch origin {ref.removeprefix('origin/')}; in GitHub Actions check out with "
                           f"fetch-depth: 0) or pass a branch, tag or commit that exists")
    return out.stdout.strip()


def git_show(ref: str, path: str, cwd: str | Path = ".") -> str | None:
    """A file's text at a git ref, or None when the file does not exist there."""
    out = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=cwd, capture_output=True, text=True, timeout=30)
    return out.stdout if out.returncode == 0 else None


def _yaml(text: str | None, where: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RetrainError(f"{where} is not valid YAML: {e}") from None
    return data if isinstance(data, dict) else {}


def _json_metrics(text: str | None, where: str) -> dict[str, float] | None:
    if text is None:
        return None
    try:
        return numeric_metrics(json.loads(text))
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; its metrics are left out of the report", where)
        return None


def run_pipeline(overrides: Sequence[str], cwd: str | Path = ".", extra: Sequence[str] = ()) -> RunResult:
    """``dvc repro`` (or ``dvc exp run -S ...`` with overrides), its output echoed to stderr as it comes.

    DVC decides what is stale: stages whose deps, params and outputs are unchanged are
    skipped, and stages it ran before with the same inputs come back from its run-cache.
    """
    cmd = [_dvc(), "exp", "run", *[a for o in overrides for a in ("-S", o)], *extra] if overrides \
        else [_dvc(), "repro", *extra]
    log.info("running %s", " ".join(cmd))
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
    except OSError as e:
        raise RetrainError(f"cannot start {cmd[0]}: {e}; install the project (make install) or put dvc on PATH") \
            from e
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stderr.write(line)  # the live log, in CI and at the terminal
            lines.append(line)
        returncode = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    output = "".join(lines)
    return RunResult(command=cmd, returncode=returncode, output=output, stages=parse_repro_output(output))


def plots_diff(base: str, out_dir: str | Path, cwd: str | Path = ".") -> bool:
    """Render ``dvc plots diff BASE`` (base against workspace) to ``out_dir``/index.html; False on failure."""
    cmd = [_dvc(), "plots", "diff", base, "--out", str(out_dir)]
    out = subprocess.run(cmd, cwd=cwd, env=_tool_env(), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        log.warning("%s failed (exit %d): %s", " ".join(cmd), out.returncode, out.stderr.strip()[-2000:])
        return False
    return True


# --------------------------------------------------------------------------- the command


def build_report(base: str, base_commit: str, cwd: Path, run: RunResult | None, overrides: Sequence[str],
                 title: str, redact_keys: Iterable[str] = ()) -> Report:
    """Read params and metrics at ``base_commit`` and in the workspace ``cwd``; assemble the report."""
    pipeline = _yaml((cwd / PIPELINE_FILE).read_text(), PIPELINE_FILE)
    old_params = _yaml(git_show(base_commit, PARAMS_FILE, cwd), f"{base}:{PARAMS_FILE}")
    new_params = _yaml((cwd / PARAMS_FILE).read_text() if (cwd / PARAMS_FILE).exists() else None, PARAMS_FILE)
    files = metric_files(pipeline)
    old_metrics: dict[str, dict[str, float]] = {}
    new_metrics: dict[str, dict[str, float]] = {}
    for f in files:
        old = _json_metrics(git_show(base_commit, f, cwd), f"{base}:{f}")
        if old is not None:
            old_metrics[f] = old
        path = cwd / f
        new = _json_metrics(path.read_text(), f) if path.is_file() else None
        if new is not None:
            new_metrics[f] = new
    registered = None
    if run is not None and run.returncode == 0 and "register" in run.stages.ran and (cwd / REGISTER_FILE).is_file():
        try:
            registered = json.loads((cwd / REGISTER_FILE).read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON", REGISTER_FILE)
    return Report(base=base, base_commit=base_commit, params=diff_params(old_params, new_params),
                  metrics=diff_metrics(old_metrics, new_metrics, files), overrides=list(overrides), run=run,
                  stage_order=stage_names(pipeline), registered=registered, title=title,
                  redact_keys=frozenset(redact_keys))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resnet.retrain",
        description="Rerun the stale part of the pipeline and report changed params and old vs new metrics "
                    "against a git ref (what CI does on a pull request).")
    p.add_argument("--base", required=True, help="git ref to compare with: main, origin/main, HEAD, a commit")
    p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="parameter override, as in dvc exp run -S (runs the pipeline as a DVC experiment)")
    p.add_argument("--report", type=Path, help="also write the markdown report to this file")
    p.add_argument("--plots-dir", type=Path, help="render dvc plots diff BASE to this folder")
    p.add_argument("--title", default="Retraining report", help="heading of the report")
    p.add_argument("--redact", action="append", default=[], metavar="KEY",
                   help="parameter whose values the report hides (e.g. data.source from a secret)")
    p.add_argument("--no-run", action="store_true", help="only report the workspace against BASE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 when the pipeline or the command fails)."""
    args = _parser().parse_args(argv)
    setup_logging()
    cwd = Path.cwd()
    try:
        if not (cwd / PIPELINE_FILE).is_file():
            raise RetrainError(f"no {PIPELINE_FILE} in {cwd}; run this from the repository root")
        overrides = parse_overrides(args.overrides)
        if args.no_run and overrides:
            raise RetrainError("-S overrides need a pipeline run; drop --no-run or the overrides")
        base_commit = resolve_ref(args.base, cwd)
        run = None if args.no_run else run_pipeline(overrides, cwd)
        report = build_report(args.base, base_commit, cwd, run, overrides, args.title, args.redact)
    except PipelineError as e:
        log.error("%s", e)
        return 1
    if (run is None or run.returncode == 0) and args.plots_dir is not None:
        if plots_diff(args.base, args.plots_dir, cwd):
            report.plots = str(args.plots_dir / "index.html")
    text = format_report(report)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    print(text, end="")
    if run is not None and run.returncode != 0:
        log.error("the pipeline failed (%s exited %d); see its output above", " ".join(run.command),
                  run.returncode)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
