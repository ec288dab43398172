"""run_suite: every model x every task, skipping what the report already holds, recording each pair as it ends.

The output folder is locked while it runs (checkpoint.FolderLock): a second evaluation into it is refused. A pair
runs in its own scratch folder, OUTPUT_DIR/work/<model>/<task>/ (emptied first: nothing of an earlier,
interrupted try is taken for this one's). A task that fails with a UserError on one model is recorded as that
pair's error and the loop goes on; `failures` then names it, and the CLI exits with 2 (the other results kept).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from encoder_train import checkpoint
from encoder_train.errors import UserError
from encoder_train.evaluation.kinds import kind_module
from encoder_train.evaluation.models import LoadedModel, ModelRow, fingerprint
from encoder_train.evaluation.report import REPORT_JSON, Report, settings_dict, task_fingerprint, versions
from encoder_train.evaluation.suite import Suite


def run_suite(suite: Suite, rows: list[ModelRow], output_dir: Path, say: Callable[[str], None] = print,
              device: torch.device | None = None) -> Report:
    """Evaluate `rows` on `suite`'s tasks into `output_dir`; one line per finished (or skipped, or failed) pair."""
    from encoder_train.devices import pick_device

    output_dir = Path(output_dir)
    device = device or pick_device()
    # One evaluation per folder at a time: two would each rewrite report.json from what they had read.
    with checkpoint.FolderLock(output_dir, flag="--output_dir"):
        return _run(suite, rows, output_dir, say, device)


def _run(suite: Suite, rows: list[ModelRow], output_dir: Path, say: Callable[[str], None],
         device: torch.device) -> Report:
    report = Report.load(output_dir)
    report.describe_suite(suite.path, suite.tasks)
    found_versions = versions()
    for row in rows:
        report.describe_model(row)
        try:
            model_fp = fingerprint(row.path)
        except OSError:  # removed since it was listed (a run's rotation, a moved folder)
            gone = f"{row.path} is gone (deleted or moved since the evaluation started); pass it where it is now"
            for task in suite.tasks:
                report.record_error(row.name, task.name, gone, {})
            report.write()
            say(f"{row.name}: {gone}")
            continue
        model = LoadedModel(row, output_dir, device)
        for task in suite.tasks:
            task_fp = task_fingerprint(task)
            if report.done(row.name, task.name, task_fp, model_fp):
                say(f"{row.name} / {task.name}: done before, kept")
                continue
            work_dir = output_dir / "work" / row.name / task.name
            shutil.rmtree(work_dir, ignore_errors=True)
            work_dir.mkdir(parents=True)
            details = {"settings": settings_dict(task), "versions": found_versions, "task_fingerprint": task_fp,
                       "model_fingerprint": model_fp}
            start = time.monotonic()
            try:
                metrics = dict(kind_module(task.kind).run(task, model, work_dir))
            except UserError as e:
                report.record_error(row.name, task.name, str(e), {**details, "seconds": time.monotonic() - start})
                report.write()
                say(f"{row.name} / {task.name}: failed: {e}")
                continue
            seconds = time.monotonic() - start
            details = {**metrics.pop("details", {}), **details, "seconds": seconds,
                       "finished": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
            report.record(row.name, task.name, metrics, details)
            report.write()
            say(f"{row.name} / {task.name}: " + ", ".join(f"{k} {_show(v)}" for k, v in metrics.items())
                + f" ({seconds:.1f} s)")
        del model  # its weights and embedder, before the next row's
    for path in report.plot(say):
        say(f"plot: {path}")
    report.write()  # report.md links the plots
    return report


def failures_sentence(report: Report, rows: list[ModelRow], suite: Suite) -> str | None:
    """One sentence naming the pairs that failed, or None."""
    failed = report.failures([r.name for r in rows], [t.name for t in suite.tasks])
    if not failed:
        return None
    model, task, error = failed[0]
    more = f" (and {len(failed) - 1} more pairs)" if len(failed) > 1 else ""
    return (f"task {task} failed on model {model}{more}: {error.rstrip('.')}; the other results are kept in "
            f"{report.directory / REPORT_JSON}: fix this and run again (finished pairs are skipped).")


def _show(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
