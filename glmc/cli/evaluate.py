"""`glmc evaluate`: GLM-130B's YAML tasks, on any backend."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from datetime import datetime
from pathlib import Path

import click

from glmc.cli import cli
from glmc.cli.model_options import model_options, open_model


@cli.command(context_settings={"show_default": True})
@click.argument("tasks", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data-path", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder holding every task's data; a task's `path` is relative to it.")
@model_options
@click.option("--micro-batch-size", type=click.IntRange(min=1),
              help="Samples per forward, overriding every task's micro-batch-size.", show_default=False)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file of all results. Default: evaluation/results-<time>.json.", show_default=False)
@click.option("--json", "as_json", is_flag=True,
              help="Print the JSON results on stdout instead of the text report (which goes to stderr).")
@click.option("--import", "modules", multiple=True, metavar="MODULE",
              help="Python module to import first (repeatable; the current folder is searched), e.g. one that "
                   "registers metrics with glmc.evaluation.register_metric.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per data file.")
def evaluate(tasks, data_path, model, micro_batch_size, output, modules, as_json, progress):
    """Evaluate TASKS (YAML files, or folders searched for them) GLM-130B's way.

    Task files are GLM-130B's: type `mul` (multiple choice, scored by the
    log-probability of each choice), `gen` (generation, greedy or beam search) or
    `lm` (language modelling in sliding windows); data are JSON lines (mul, gen) or
    text (lm) under DATA_PATH/<path>, grouped by `file-pattern`. Each file's
    metrics are printed as it finishes, then each group's max, median and average.
    Metrics: Accuracy, Precision, Recall, F1_mul (multiple choice), EM, F1
    (generation), PPL (language modelling), and any registered by an --import
    module; a task's `module` names its own task class.

    A task's `module` and every --import MODULE are Python code that runs with
    your rights, as GLM-130B's task modules do: evaluate only task folders you
    trust.

    \b
    Examples:
      glmc evaluate tasks/demo --data-path tasks/demo/data
      glmc evaluate tasks/bloom/glue_cola.yaml --data-path DATA --checkpoint CKPT --tp 8
      glmc evaluate tasks --data-path DATA --package PKG --backend onnxruntime --json
    """
    from glmc.evaluation import find_task_files, fit_to_model, import_modules, read_task

    import_modules(list(modules))
    task_files = find_task_files(list(tasks))
    loaded = [read_task(path) for path in task_files]  # every file checked before the model loads
    for item in loaded:
        if micro_batch_size:
            item.config = dataclasses.replace(item.config, micro_batch_size=micro_batch_size)
    report = click.get_text_stream("stderr" if as_json else "stdout")

    def say(line: str = "") -> None:
        click.echo(line, file=report)

    for item in loaded:
        say(f"Task {item.config.name} loaded from config {item.path}")
    glm = open_model(model)
    if glm is None:  # a torchrun rank other than 0: it served rank 0 until the end
        return
    results, start = [], time.perf_counter()
    with glm:
        for item in loaded:
            fit_to_model(item, glm.config.max_sequence_length)
            for note in item.notes:
                click.echo(f"glmc: note: {note}", err=True)
            task = item.task_class(glm, item.config, data_path, source=str(item.path))
            say()
            say(repr(dataclasses.replace(task.config, path=str(task.root))))
            say(f"Evaluating task {task.config.name}:")
            result = task.evaluate(_Console(say, progress))
            say(f"Evaluation results of task {task.config.name}:")
            for group in result.groups:
                _report_group(say, group, result.summary(group))
            say(f"Finish task {task.config.name} in {result.seconds:.1f}s.")
            results.append(result)
    total = time.perf_counter() - start
    say(f"Finish {len(results)} task{'s' if len(results) != 1 else ''} in {total:.1f}s")
    document = {
        "model": str(model.source) if model.source else "embedded default",
        "backend": model.backend,
        "tp": model.tp_size,
        "data_path": str(data_path),
        "seconds": round(total, 3),
        "tasks": [r.to_json() for r in results],
    }
    path = output or Path("evaluation") / f"results-{datetime.now():%Y%m%d-%H%M%S}.json"
    _write_json(path, document)
    click.echo(f"glmc: results written to {path}", err=True)
    if as_json:
        click.echo(_dumps(document))


class _Console:
    """Prints GLM-130B's report lines and a progress bar per file (on stderr)."""

    def __init__(self, say, progress: bool):
        self.say, self.show_progress = say, progress

    def group_started(self, task, group: str) -> None:
        self.say(f"  Evaluating group {group}:")

    def progress(self, task, file: str, total: int):
        from tqdm import tqdm

        return tqdm(total=total, desc=f"{task.config.name} {file}", unit="sample", leave=False,
                    disable=not self.show_progress, dynamic_ncols=True)

    def file_finished(self, task, result) -> None:
        scores = "".join(f", {name} = {_number(value)}" for name, value in result.metrics.items())
        self.say(f"      Finish {result.file}{scores}")


def _report_group(say, group: str, stats: dict) -> None:
    if len(stats) == 1:
        name, s = next(iter(stats.items()))
        say(f"  Group {group} {name}: max = {_number(s['max'])}, median = {_number(s['median'])}, "
            f"average = {_number(s['average'])}")
        return
    say(f"  Group {group}:")
    for name, s in stats.items():
        say(f"      Metric {name}: max = {_number(s['max'])}, median = {_number(s['median'])}, "
            f"average = {_number(s['average'])}")


def _number(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.3f}"
    return json.dumps(_strict(value), ensure_ascii=False)[:200]


def _strict(value):
    """`value` with every NaN or infinity replaced by null: strict JSON parsers refuse them, so
    the results file never holds one (a metric may still compute one, e.g. a custom metric)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def _dumps(document: dict) -> str:
    return json.dumps(_strict(document), indent=2, ensure_ascii=False, allow_nan=False)


def _write_json(path: Path, document: dict) -> None:
    from glmc.fileio import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, _dumps(document) + "\n")
