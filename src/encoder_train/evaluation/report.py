"""The report card: DIR/report.json (what a program reads), DIR/report.md (what a person reads), DIR/plots/*.png.

report.json:

    {"results": {MODEL: {TASK: {metric: value, ...}}},          finished pairs only
     "details": {MODEL: {TASK: {"seeds", "spread", "settings", "seconds", "versions", "finished",
                                "task_fingerprint", "model_fingerprint", ... the kind's own, or "error"}}},
     "models":  {MODEL: {"path", "step", "kind", "group"}},
     "suite":   {"path", "tasks": {TASK: {"kind", "settings", "reference", "reference_source"}}}}

It is rewritten whole, atomically (a temporary file renamed over it), after every (model, task) pair, so a kill
loses at most the pair in progress; a rerun skips a pair whose result was computed with the same task settings
(`task_fingerprint`) on the same model files (`model_fingerprint`: sizes and modification times). A pair that
failed keeps its error in details and is tried again by the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from encoder_train.errors import UserError, install_hint
from encoder_train.evaluation.models import ModelRow
from encoder_train.evaluation.spec import TaskConfig

REPORT_JSON, REPORT_MD, PLOTS = "report.json", "report.md", "plots"
PACKAGES = ("torch", "transformers", "sentence-transformers", "encoder-train")


def settings_dict(task: TaskConfig) -> dict[str, Any]:
    """The task's settings as JSON values (paths as text)."""
    return json.loads(json.dumps(dataclasses.asdict(task.settings), default=str))


def task_fingerprint(task: TaskConfig) -> str:
    """What a result depends on: the kind and its settings (not the reference values, nor the task's name)."""
    text = json.dumps({"kind": task.kind, "settings": settings_dict(task)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@dataclass
class Report:
    directory: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> Report:
        """The report already in `directory`, or an empty one."""
        path = directory / REPORT_JSON
        data: dict[str, Any] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"{path} is not the JSON a previous evaluation wrote; move it away (it is not "
                                "overwritten) or pass another --output_dir.") from None
            if not isinstance(data, dict) or not isinstance(data.get("results", {}), dict):
                raise UserError(f"{path} is not an evaluation report; move it away or pass another --output_dir.")
        for key in ("results", "details", "models"):
            data.setdefault(key, {})
        data.setdefault("suite", {"path": None, "tasks": {}})
        return cls(directory, data)

    # ---- what is recorded ----

    def describe_suite(self, suite_path: Path, tasks: list[TaskConfig]) -> None:
        """The suite's tasks join those of earlier runs into the same folder (a task of that name is replaced)."""
        self.data["suite"]["path"] = str(suite_path)
        for task in tasks:
            self.data["suite"]["tasks"][task.name] = {
                "kind": task.kind, "settings": settings_dict(task), "reference": task.reference,
                "reference_source": task.reference_source}

    def describe_model(self, row: ModelRow) -> None:
        self.data["models"][row.name] = {"path": str(row.path), "step": row.step, "kind": row.kind,
                                         "group": row.group}

    def done(self, model: str, task: str, task_fp: str, model_fp: str) -> bool:
        details = self.data["details"].get(model, {}).get(task)
        return (details is not None and "error" not in details and task in self.data["results"].get(model, {})
                and details.get("task_fingerprint") == task_fp and details.get("model_fingerprint") == model_fp)

    def record(self, model: str, task: str, metrics: dict[str, Any], details: dict[str, Any]) -> None:
        self.data["results"].setdefault(model, {})[task] = metrics
        self.data["details"].setdefault(model, {})[task] = details

    def record_error(self, model: str, task: str, error: str, details: dict[str, Any]) -> None:
        self.data["results"].get(model, {}).pop(task, None)
        self.data["details"].setdefault(model, {})[task] = {**details, "error": error}

    def failures(self, models: list[str], tasks: list[str]) -> list[tuple[str, str, str]]:
        """(model, task, error) of the given pairs that failed."""
        return [(m, t, self.data["details"][m][t]["error"]) for m in models for t in tasks
                if "error" in self.data["details"].get(m, {}).get(t, {})]

    # ---- the files ----

    def write(self) -> None:
        """report.json and report.md, each replaced atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.directory / REPORT_JSON, json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        _write_atomic(self.directory / REPORT_MD, self.markdown())

    def markdown(self) -> str:
        """One table per task: a row per model (a run's checkpoints in step order), a column per metric; the
        suite's reference values as the last row, with their source; a failed pair shows its error."""
        results, details, models = self.data["results"], self.data["details"], self.data["models"]
        tasks = list(self.data["suite"]["tasks"])
        tasks += [t for m in details.values() for t in m if t not in tasks]
        order = sorted(models, key=lambda m: (list(models).index(m) if models[m]["step"] is None
                                              else _first_of(models, models[m]["group"]), models[m]["step"] or 0))
        lines = ["# Evaluation report", ""]
        for task in tasks:
            info = self.data["suite"]["tasks"].get(task, {})
            rows = [m for m in order if task in details.get(m, {})]
            if not rows:
                continue
            metrics: list[str] = []
            for m in rows:
                metrics += [k for k in results.get(m, {}).get(task, {}) if k not in metrics]
            reference = info.get("reference") or {}
            metrics += [k for k in reference if k not in metrics]
            lines += [f"## {task}" + (f" ({info['kind']})" if info.get("kind") else ""), "",
                      "| model | " + " | ".join(metrics) + " |", "|---" + "|---:" * len(metrics) + "|"]
            for m in rows:
                d = details[m][task]
                if "error" in d:
                    lines.append(f"| {m} | failed: {d['error'].replace('|', '/')} |" + " |" * (len(metrics) - 1))
                    continue
                values = results[m][task]
                spread = d.get("spread", {})
                lines.append(f"| {m} | " + " | ".join(_cell(values.get(k), spread.get(k)) for k in metrics) + " |")
            if reference:
                lines.append("| reference | " + " | ".join(_cell(reference.get(k), None) for k in metrics) + " |")
                if info.get("reference_source"):
                    lines += ["", f"Reference: {info['reference_source']}."]
            lines.append("")
        plots = sorted((self.directory / PLOTS).glob("*.png")) if (self.directory / PLOTS).is_dir() else []
        if plots:
            lines += ["## Across checkpoints", ""] + [f"![{p.stem}]({PLOTS}/{p.name})" for p in plots] + [""]
        return "\n".join(lines)

    def plot(self, say=print) -> list[Path]:
        """For each run given as a folder (rows sharing a group, with steps): one PNG per metric, x the step, one
        line per task that reports it (and a dashed one at its reference value). Skipped, with a note, without
        matplotlib (the `eval` extra)."""
        models, results = self.data["models"], self.data["results"]
        groups: dict[str, list[str]] = {}
        for m, info in models.items():
            if info["step"] is not None and m != info["group"]:  # NAME@STEP rows: a run folder's
                groups.setdefault(info["group"], []).append(m)
        runs = {g: sorted(ms, key=lambda m: models[m]["step"]) for g, ms in groups.items() if len(ms) > 1}
        if not runs:
            return []
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only, no display
            import matplotlib.pyplot as plt
        except ImportError:
            say(f"plots skipped: they need matplotlib; {install_hint('eval')} adds it.")
            return []
        written = []
        out = self.directory / PLOTS
        out.mkdir(parents=True, exist_ok=True)
        for group, rows in runs.items():
            lines: dict[str, dict[str, list[tuple[int, float]]]] = {}  # metric -> task -> (step, value)
            for m in rows:
                for task, values in results.get(m, {}).items():
                    for metric, v in values.items():
                        if isinstance(v, (int, float)) and math.isfinite(v):
                            lines.setdefault(metric, {}).setdefault(task, []).append((models[m]["step"], v))
            for metric, tasks in lines.items():
                fig, ax = plt.subplots(figsize=(6, 4))
                for task, points in tasks.items():
                    line, = ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=task)
                    reference = self.data["suite"]["tasks"].get(task, {}).get("reference", {}).get(metric)
                    if reference is not None:  # the published value, in the task's colour
                        ax.axhline(reference, linestyle="--", color=line.get_color(), label=f"{task}: reference")
                ax.set_xlabel("step")
                ax.set_ylabel(metric)
                ax.set_title(f"{group}: {metric}")
                ax.legend()
                fig.tight_layout()
                path = out / f"{group}.{metric.replace('/', '_')}.png"
                fig.savefig(path, dpi=100)
                plt.close(fig)
                written.append(path)
        return written


def _first_of(models: dict[str, Any], group: str) -> int:
    return min(i for i, m in enumerate(models) if models[m]["group"] == group)


def _cell(value: Any, spread: dict[str, float] | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, (int, float)):
        return str(value)
    text = f"{value:.4f}"
    if spread and "min" in spread and "max" in spread:
        text += f" [{spread['min']:.4f}, {spread['max']:.4f}]"
    return text


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
