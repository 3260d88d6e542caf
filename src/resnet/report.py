"""The retraining report: DVC's JSON (params diff, metrics diff, status, exp show) to markdown.

Pure functions, no processes: :mod:`resnet.retrain` runs git and DVC and hands their
JSON here. Unit-tested on JSON captured from real DVC runs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from resnet.redaction import bare_key, redact, redact_override, scrub

__all__ = [
    "MISSING",
    "REPRODUCED",
    "STILL_STALE",
    "UNCHANGED",
    "ParamChange",
    "MetricRow",
    "StageLog",
    "RunResult",
    "Report",
    "param_changes",
    "metric_rows",
    "metric_files",
    "stage_names",
    "stage_outcomes",
    "new_experiments",
    "redact",
    "format_report",
]

PARAMS_FILE: Final = "params.yaml"
PIPELINE_FILE: Final = "dvc.yaml"
DASH: Final = "—"
# How much of a failed pipeline's output the report quotes.
FAILURE_TAIL_LINES: Final = 40
# What the Stages table says of each stage (see stage_outcomes).
REPRODUCED: Final = "**reproduced**"
STILL_STALE: Final = "**still stale**: failed or not reached"
UNCHANGED: Final = "unchanged, skipped"
# dvc status's reason for a stage with ``always_changed: true``: stale before and after every run.
ALWAYS_CHANGED: Final = "always changed"


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


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ParamChange:
    """One parameter that differs between the base ref and the workspace (None: null or absent, as DVC says)."""

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
    """What ``dvc repro`` / ``dvc exp run`` did with each stage, from DVC's state before and after the run."""

    reproduced: list[str] = field(default_factory=list)  # ran, or restored from the run-cache
    stale: list[str] = field(default_factory=list)  # still stale after the run: failed or not reached
    unchanged: list[str] = field(default_factory=list)
    experiments: list[str] = field(default_factory=list)  # the names dvc exp run gave the run


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
    gate_metric: str | None = None  # register.metric: what the registry compares, shown first
    mlflow_run: dict[str, Any] | None = None  # models/run.json: run_id, experiment_id, tracking_uri


# --------------------------------------------------------------------------- pure functions


def param_changes(diff: Mapping[str, Any]) -> list[ParamChange]:
    """The changed parameters in ``dvc params diff BASE --json`` output, sorted by key.

    ``diff`` is ``{file: {dotted.key: {"old": ..., "new": ...}}}``. DVC writes a key that
    exists on one side only as null on the other, so an added or removed key shows as
    ``null``, and it compares as Python does (``true`` and ``1`` are the same to it).
    Keys of params.yaml are bare (``train.lr``), those of other params files ``file:key``.
    """
    changes = []
    for file, keys in diff.items():
        for key, values in (keys or {}).items():
            if isinstance(values, Mapping):
                name = key if file == PARAMS_FILE else f"{file}:{key}"
                changes.append(ParamChange(name, values.get("old"), values.get("new")))
    return sorted(changes, key=lambda c: c.key)


def _metric(value: Any) -> float | _Missing:
    # dvc metrics show strings and booleans too (a checkpoint path, stopped_early): not numbers to compare.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return MISSING


def metric_rows(diff: Mapping[str, Any], files: Sequence[str] = ()) -> list[MetricRow]:
    """Old against new numeric metrics from ``dvc metrics diff BASE --all --json`` output.

    ``diff`` is ``{file: {dotted.key: {"old": ..., "new": ..., "diff": ...}}}``; a side
    without the metric (first run: every old value) is null there and MISSING here.
    Rows follow ``files`` (the order dvc.yaml names them), then any other file, keys sorted.
    """
    order = [f for f in files if f in diff] + sorted(set(diff) - set(files))
    rows = []
    for f in order:
        for key, values in sorted((diff[f] or {}).items()):
            if not isinstance(values, Mapping):
                continue
            old, new = _metric(values.get("old")), _metric(values.get("new"))
            if not (isinstance(old, _Missing) and isinstance(new, _Missing)):
                rows.append(MetricRow(f, key, old, new))
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


def _stage_key(name: str) -> str:
    # dvc status names a stage of another dvc.yaml "sub/dvc.yaml:name"; the root one's prefix says nothing.
    return name.removeprefix(f"{PIPELINE_FILE}:")


def _stale(reasons: Any) -> bool:
    """Whether a ``dvc status --json`` entry says more than that the stage is always_changed."""
    return any(r != ALWAYS_CHANGED for r in reasons) if isinstance(reasons, list) else bool(reasons)


def stage_outcomes(
    status_before: Mapping[str, Any],
    status_after: Mapping[str, Any],
    lock_before: Mapping[str, Any],
    lock_after: Mapping[str, Any],
) -> StageLog:
    """What DVC did with each stage, from ``dvc status --json`` and the ``stages`` of dvc.lock
    before and after the run.

    * reproduced: stale before the run (``dvc status`` lists it) or its dvc.lock entry
      changed (a stage made stale by an upstream stage's new outputs), and not stale
      after. DVC's JSON does not say whether it ran the stage or restored its outputs
      from the run-cache, so the report says "reproduced" for both.
    * stale: still stale after the run: the stage that failed, or one it never reached.
    * unchanged: up to date and its dvc.lock entry unchanged: DVC skipped it.
    """
    before = {_stage_key(k) for k in status_before}
    after = {_stage_key(k) for k, reasons in status_after.items() if _stale(reasons)}
    changed = {k for k, entry in lock_after.items() if lock_before.get(k) != entry}
    names = dict.fromkeys([*lock_after, *map(_stage_key, status_before), *map(_stage_key, status_after)])
    result = StageLog()
    for name in names:
        if name in after:
            result.stale.append(name)
        elif name in before or name in changed:
            result.reproduced.append(name)
        else:
            result.unchanged.append(name)
    return result


def new_experiments(shown_before: Any, shown_after: Any) -> list[str]:
    """The names of the experiments in ``dvc exp show --json`` output after a run and not before."""
    before = _experiment_revs(shown_before)
    return [name for rev, name in _experiment_revs(shown_after).items() if rev not in before]


def _experiment_revs(shown: Any) -> dict[str, str]:
    """Commit -> name of each experiment in ``dvc exp show --json`` output (a list of baselines)."""
    revs: dict[str, str] = {}
    for baseline in shown if isinstance(shown, list) else []:
        for exp in (baseline or {}).get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("rev"):
                    revs[rev["rev"]] = rev.get("name") or exp.get("name") or rev["rev"][:7]
    return revs


def _cell(value: Any) -> str:
    """A value as a markdown table cell, written the way YAML would."""
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
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else '`""`'


# Scores and losses in [0, 1]-ish ranges: four decimals always (1.0000, not 1). Seconds and
# throughputs: one decimal. Counts (images, epochs): integers.
_FRACTION_KEYS: Final = ("accuracy", "loss", "precision", "recall", "f1")
_RATE_KEYS: Final = ("seconds", "per_sec")
# Rows that say nothing about the model: what it was evaluated on and bookkeeping.
_NOISE_KEYS: Final = ("num_classes", "topk", "checkpoint_epoch", "resumed_from_epoch")
_NOISE_FILES: Final = ("metrics/register.json",)  # the registry's outcome has a section of its own


def _number(key: str, value: float, sign: str = "") -> str:
    """``value`` of metric ``key`` written the same way in every row and report."""
    if key.endswith(_FRACTION_KEYS):
        return f"{value:{sign}.4f}"
    if key.endswith(_RATE_KEYS):
        return f"{value:{sign}.1f}"
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):{sign}d}"
    return f"{value:{sign}.4f}"


def _num(key: str, value: float | _Missing) -> str:
    return DASH if isinstance(value, _Missing) else _number(key, value)


def _delta(key: str, d: float | None) -> str:
    if d is None:
        return ""
    return "0" if d == 0 else _number(key, d, "+")


def _param_cell(value: Any, hide: bool) -> str:
    """A parameter value for the report: stars when redacted, URLs without credentials."""
    return "`***`" if hide else _cell(redact(value))


def _short(commit: str) -> str:
    return commit[:10] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit


def format_report(report: Report) -> str:
    """The markdown report: run status, stages, changed params, old vs new metrics, the registry."""
    lines = _header(report) + _headline(report)
    if report.run is not None:
        lines += _stage_table(report.run, report.stage_order)
    lines += _params_table(report) + _metrics_table(report)
    if report.registered:
        r = report.registered
        lines += [
            "### Model registry",
            "",
            f"`{r.get('model_name')}` version {r.get('version')} "
            + (f"is **@{r['alias']}**" if r.get("alias") else "holds no alias")
            + f": {r.get('reason')}.",
            "",
        ]
    lines += _mlflow_run(report)
    if report.plots:
        lines += ["### Plots", "", f"`dvc plots diff {report.base}` rendered to `{report.plots}`.", ""]
    if report.run is not None and report.run.returncode:
        lines += _failure(report.run, _secrets(report))
    return "\n".join(lines).rstrip() + "\n"


def _header(report: Report) -> list[str]:
    """Title, base, overrides, the command and its outcome."""
    lines = [f"## {report.title}", ""]
    base = f"`{report.base}`" + (f" ({_short(report.base_commit)})" if report.base_commit != report.base else "")
    lines.append(f"Compared with {base}.")
    if report.overrides:
        shown = " ".join(f"`-S {redact_override(o, report.redact_keys)}`" for o in report.overrides)
        lines.append(f"Overrides: {shown}")
    run = report.run
    if run is None:
        lines.append("Pipeline not run (`--no-run`): the workspace as it is.")
    else:
        # The command as a user would type it: "dvc", not the venv's full path to it.
        args = run.command[1:]
        args = [redact_override(a, report.redact_keys) if i and args[i - 1] == "-S" else a for i, a in enumerate(args)]
        shown = " ".join(["dvc", *args])
        outcome = "**succeeded**" if run.returncode == 0 else f"**failed** with exit status {run.returncode}"
        lines.append(f"Pipeline: {outcome} (`{shown}`).")
        if run.stages.experiments:
            names = ", ".join(f"`{name}`" for name in run.stages.experiments)
            lines.append(f"DVC experiment{'s' if len(run.stages.experiments) > 1 else ''}: {names}.")
    return [*lines, ""]


def _params_table(report: Report) -> list[str]:
    lines = ["### Parameters changed", ""]
    if report.params:
        lines += ["| parameter | old | new |", "| --- | --- | --- |"]
        for c in report.params:
            hide = c.key in report.redact_keys
            lines.append(f"| {c.key} | {_param_cell(c.old, hide)} | {_param_cell(c.new, hide)} |")
    else:
        lines.append(f"None: params.yaml is the same as at `{report.base}`.")
    return [*lines, ""]


def _gate_row(report: Report) -> MetricRow | None:
    return next((r for r in report.metrics if report.gate_metric and r.key == report.gate_metric), None)


def _headline(report: Report) -> list[str]:
    """The metric the registry gates on, old -> new, before anything else."""
    row = _gate_row(report)
    if row is None:
        return []
    change = f" ({_delta(row.key, row.delta)})" if row.delta is not None else ""
    return [
        f"**{row.key}** (what the registry compares): {_num(row.key, row.old)} → {_num(row.key, row.new)}{change}.",
        "",
    ]


def _shown_metrics(report: Report) -> list[MetricRow]:
    """The rows worth reading: the gated metric first, no bookkeeping."""
    gate = _gate_row(report)
    rows = [r for r in report.metrics if r.file not in _NOISE_FILES and not r.key.endswith(_NOISE_KEYS)]
    return ([gate] if gate else []) + [r for r in rows if r is not gate]


def _mlflow_run(report: Report) -> list[str]:
    run = report.mlflow_run
    if not run or not run.get("run_id"):
        return []
    uri = str(redact(str(run.get("tracking_uri", ""))))
    page = f"#/experiments/{run.get('experiment_id')}/runs/{run['run_id']}"
    if uri.startswith(("http://", "https://")):
        where = f"{uri.rstrip('/')}/{page}"
    else:  # the embedded store: served by `make ui`
        where = f"http://127.0.0.1:5000/{page} (after `make ui`)"
    return ["### MLflow run", "", f"`{run['run_id']}` in `{uri}`: {where}", ""]


def _metrics_table(report: Report) -> list[str]:
    lines = ["### Metrics", ""]
    rows = _shown_metrics(report)
    if rows:
        lines += ["| file | metric | old | new | change |", "| --- | --- | ---: | ---: | ---: |"]
        for r in rows:
            old, new, change = _num(r.key, r.old), _num(r.key, r.new), _delta(r.key, r.delta)
            lines.append(f"| {r.file} | {r.key} | {old} | {new} | {change} |")
        if all(isinstance(r.old, _Missing) for r in rows):
            lines += ["", f"`{report.base}` has no metrics yet (first run): old values are {DASH}."]
    else:
        lines.append("No metrics files found.")
    return [*lines, ""]


def _failure(run: RunResult, secrets: Sequence[str]) -> list[str]:
    """The end of a failed pipeline's output, without secrets."""
    tail = scrub("\n".join(run.output.rstrip().splitlines()[-FAILURE_TAIL_LINES:]), secrets)
    return [
        "### Failure",
        "",
        "<details><summary>last lines of the pipeline's output</summary>",
        "",
        "```",
        tail.replace("```", "'''"),
        "```",
        "",
        "</details>",
        "",
    ]


def _stage_table(run: RunResult, stage_order: Sequence[str]) -> list[str]:
    """The Stages section: each stage of dvc.yaml (in file order, then any other DVC named) and its outcome."""
    stages = run.stages
    seen = stages.reproduced + stages.stale + stages.unchanged
    order: list[str] = []
    for name in stage_order:
        # A foreach/matrix stage is "name@key" in dvc.lock and dvc status, one per generated stage.
        order += [s for s in seen if s.startswith(f"{name}@")] or [name]
    order += [s for s in seen if s not in order]
    lines = ["### Stages", "", "| stage | what happened |", "| --- | --- |"]
    for stage in order:
        if stage in stages.reproduced:
            what = REPRODUCED
        elif stage in stages.stale:
            what = STILL_STALE
        elif stage in stages.unchanged:
            what = UNCHANGED
        else:
            what = "not reached" if run.returncode else "not in the run"
        lines.append(f"| {stage} | {what} |")
    if stages.reproduced:
        lines += [
            "",
            "Reproduced: DVC ran the stage or restored its outputs from the run-cache "
            "(its machine-readable output does not say which).",
        ]
    return lines + [""]


def _secrets(report: Report) -> list[str]:
    """The values of the redacted keys, wherever the report might quote them."""
    values = [c.old for c in report.params if c.key in report.redact_keys]
    values += [c.new for c in report.params if c.key in report.redact_keys]
    for o in report.overrides:
        key, _, value = o.partition("=")
        if bare_key(key) in report.redact_keys:
            values.append(value)
    return sorted({v for v in values if isinstance(v, str) and v}, key=len, reverse=True)
