"""``python -m resnet.retrain --base REF [-S key=value ...]``: what CI does when the recipe changes.

1. Runs the pipeline: ``dvc repro`` (only the stages DVC finds stale), or
   ``dvc exp run -S ...`` when overrides are given (the overrides are written to
   params.yaml, as ``dvc exp run`` always does). Its log streams to stderr as it comes.
2. Prints a markdown report, built only from DVC's machine-readable output (its console
   wording may change without breaking it):

   * the parameters that differ from ``REF`` (old → new): ``dvc params diff REF --json``;
   * the metrics of ``REF`` against the new ones: ``dvc metrics diff REF --all --json``
     (a ref without metrics, the first run, shows "—" for the old values);
   * what DVC did with each stage: ``dvc status --json`` before and after the run and
     the stages of ``dvc.lock`` before and after (see :func:`stage_outcomes`), and the
     experiment's name from ``dvc exp show --json``;
   * what the register stage did with the new model (``metrics/register.json``).

``--report PATH`` also writes the report to a file (the GitHub workflow appends it to
the job summary and posts it on the pull request); ``--plots-dir DIR`` renders
``dvc plots diff REF`` there. The exit status is non-zero when the pipeline fails; the
report is written anyway and says so.

Converting DVC's JSON and formatting the report are pure functions in
:mod:`resnet.report`; only :func:`dvc_json`, :func:`resolve_ref`, :func:`run_pipeline`
and :func:`plots_diff` here start processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from resnet import paths
from resnet.redaction import scrub
from resnet.report import (
    PIPELINE_FILE,
    Report,
    RunResult,
    format_report,
    metric_files,
    metric_rows,
    new_experiments,
    param_changes,
    stage_names,
    stage_outcomes,
)
from resnet.utils import PipelineError, setup_logging

__all__ = [
    "RetrainError",
    "parse_overrides",
    "build_report",
    "dvc_json",
    "resolve_ref",
    "run_pipeline",
    "plots_diff",
    "main",
]

log = logging.getLogger(__name__)

LOCK_FILE: Final = "dvc.lock"
REGISTER_FILE: Final = str(paths.REGISTER_RESULT)


class RetrainError(PipelineError):
    """The retrain command cannot start: a bad ref, override or working directory."""


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
            raise RetrainError(
                f"-S {value!r} is not an override; write it as key=value with the dotted "
                f"params.yaml key, e.g. -S train.lr=0.05"
            )
        out.append(value)
    return out


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
        out = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RetrainError(f"cannot run git to resolve --base {ref!r}: {e}") from e
    if out.returncode != 0 or not out.stdout.strip():
        raise RetrainError(
            f"--base {ref!r} is not a commit in this repository; fetch it first "
            f"(git fetch origin {ref.removeprefix('origin/')}; in GitHub Actions check out with "
            f"fetch-depth: 0) or pass a branch, tag or commit that exists"
        )
    return out.stdout.strip()


def dvc_json(args: Sequence[str], cwd: str | Path = ".", timeout: float = 600) -> Any:
    """What ``dvc ARGS --json`` prints, parsed; RetrainError naming the command when DVC fails."""
    shown = " ".join(["dvc", *args, "--json"])
    try:
        out = subprocess.run(
            [_dvc(), *args, "--json"], cwd=cwd, env=_tool_env(), capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RetrainError(f"cannot run `{shown}`: {e}; install the project (make install) or put dvc on PATH") from e
    # DVC's warnings (e.g. that the base has no metrics yet, on a first run) go to stderr.
    warnings = scrub(out.stderr.strip()[-2000:], ())
    if out.returncode != 0:
        raise RetrainError(
            f"`{shown}` exited {out.returncode}: {warnings or 'no message'}; run it in {cwd} to see the whole error"
        )
    if warnings:
        log.info("%s: %s", shown, warnings)
    try:
        return json.loads(out.stdout) if out.stdout.strip() else {}
    except json.JSONDecodeError as e:
        raise RetrainError(
            f"`{shown}` did not print JSON ({e}): {out.stdout[:200]!r}; this needs DVC 3 (make install)"
        ) from None


def _yaml(text: str | None, where: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RetrainError(f"{where} is not valid YAML: {e}") from None
    return data if isinstance(data, dict) else {}


def _dvc_state(cwd: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``dvc status --json`` and the stages in dvc.lock: what is stale now, and what DVC last produced.

    Either is empty, with a warning, when it cannot be read: the run and the rest of the
    report do not depend on it.
    """
    try:
        status = dvc_json(["status"], cwd)
    except RetrainError as e:
        log.warning("%s; the report's stages table may be incomplete", e)
        status = {}
    lock_path = cwd / LOCK_FILE
    try:
        lock = _yaml(lock_path.read_text() if lock_path.is_file() else None, LOCK_FILE)
    except RetrainError as e:
        log.warning("%s; the report's stages table may be incomplete", e)
        lock = {}
    stages = lock.get("stages")
    return (status if isinstance(status, dict) else {}), (stages if isinstance(stages, dict) else {})


def _experiments_shown(cwd: Path) -> Any:
    """``dvc exp show --json`` (the experiments of HEAD), or None with a warning when it fails."""
    try:
        return dvc_json(["exp", "show"], cwd)
    except RetrainError as e:
        log.warning("%s; the report leaves out the experiment's name", e)
        return None


def _stream(cmd: Sequence[str], cwd: Path) -> tuple[int, str]:
    """Run ``cmd``, echoing its combined output to stderr as it comes; its exit status and output."""
    lines: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=_tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
    except OSError as e:
        raise RetrainError(f"cannot start {cmd[0]}: {e}; install the project (make install) or put dvc on PATH") from e
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stderr.write(line)  # the live log, in CI and at the terminal; the report does not parse it
            lines.append(line)
        returncode = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    return returncode, "".join(lines)


def run_pipeline(overrides: Sequence[str], cwd: str | Path = ".", extra: Sequence[str] = ()) -> RunResult:
    """``dvc repro`` (or ``dvc exp run -S ...`` with overrides), its output echoed to stderr as it comes.

    DVC decides what is stale: stages whose deps, params and outputs are unchanged are
    skipped, and stages it ran before with the same inputs come back from its run-cache.
    What it did with each stage comes from its JSON and dvc.lock (:func:`stage_outcomes`),
    never from its log.
    """
    cwd = Path(cwd)
    cmd = (
        [_dvc(), "exp", "run", *[a for o in overrides for a in ("-S", o)], *extra]
        if overrides
        else [_dvc(), "repro", *extra]
    )
    status_before, lock_before = _dvc_state(cwd)
    shown_before = _experiments_shown(cwd) if overrides else None
    log.info("running %s", " ".join(cmd))
    returncode, output = _stream(cmd, cwd)
    status_after, lock_after = _dvc_state(cwd)
    stages = stage_outcomes(status_before, status_after, lock_before, lock_after)
    if overrides and shown_before is not None:
        stages.experiments = new_experiments(shown_before, _experiments_shown(cwd))
    return RunResult(command=cmd, returncode=returncode, output=output, stages=stages)


def plots_diff(base: str, out_dir: str | Path, cwd: str | Path = ".") -> bool:
    """Render ``dvc plots diff BASE`` (base against workspace) to ``out_dir``/index.html; False on failure."""
    cmd = [_dvc(), "plots", "diff", base, "--out", str(out_dir)]
    out = subprocess.run(cmd, cwd=cwd, env=_tool_env(), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        log.warning("%s failed (exit %d): %s", " ".join(cmd), out.returncode, out.stderr.strip()[-2000:])
        return False
    return True


# --------------------------------------------------------------------------- the command


def build_report(
    base: str,
    base_commit: str,
    cwd: Path,
    run: RunResult | None,
    overrides: Sequence[str],
    title: str,
    redact_keys: Iterable[str] = (),
) -> Report:
    """Params and metrics of the workspace ``cwd`` against ``base_commit``, as DVC diffs them; the report."""
    pipeline = _yaml((cwd / PIPELINE_FILE).read_text(), PIPELINE_FILE)
    params = param_changes(dvc_json(["params", "diff", base_commit], cwd))
    # --all: unchanged metrics too; "no change" is a result worth a row.
    metrics = metric_rows(dvc_json(["metrics", "diff", base_commit, "--all"], cwd), metric_files(pipeline))
    registered = None
    # A register stage restored from the run-cache counts too (DVC's JSON does not tell it apart): its
    # register.json then describes the earlier, identical registration.
    if (
        run is not None
        and run.returncode == 0
        and "register" in run.stages.reproduced
        and (cwd / REGISTER_FILE).is_file()
    ):
        try:
            registered = json.loads((cwd / REGISTER_FILE).read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON", REGISTER_FILE)
    return Report(
        base=base,
        base_commit=base_commit,
        params=params,
        metrics=metrics,
        overrides=list(overrides),
        run=run,
        stage_order=stage_names(pipeline),
        registered=registered,
        title=title,
        redact_keys=frozenset(redact_keys),
        gate_metric=_gate_metric(cwd),
        mlflow_run=_json_or_none(cwd / paths.RUN_FILE),
    )


def _gate_metric(cwd: Path) -> str | None:
    """register.metric of the workspace's params.yaml: the metric the report leads with."""
    try:
        return _yaml((cwd / paths.PARAMS).read_text(), str(paths.PARAMS)).get("register", {}).get("metric")
    except (OSError, AttributeError, PipelineError):
        return None


def _json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return found if isinstance(found, dict) else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resnet.retrain",
        description="Rerun the stale part of the pipeline and report changed params and old vs new metrics "
        "against a git ref (what CI does on a pull request).",
    )
    p.add_argument("--base", required=True, help="git ref to compare with: main, origin/main, HEAD, a commit")
    p.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="parameter override, as in dvc exp run -S (runs the pipeline as a DVC experiment)",
    )
    p.add_argument("--report", type=Path, help="also write the markdown report to this file")
    p.add_argument("--plots-dir", type=Path, help="render dvc plots diff BASE to this folder")
    p.add_argument("--title", default="Retraining report", help="heading of the report")
    p.add_argument(
        "--redact",
        action="append",
        default=[],
        metavar="KEY",
        help="parameter whose values the report hides (e.g. data.source from a secret)",
    )
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
    if (
        (run is None or run.returncode == 0)
        and args.plots_dir is not None
        and plots_diff(args.base, args.plots_dir, cwd)
    ):
        report.plots = str(args.plots_dir / "index.html")
    text = format_report(report)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    print(text, end="")
    if run is not None and run.returncode != 0:
        log.error("the pipeline failed (%s exited %d); see its output above", " ".join(run.command), run.returncode)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
