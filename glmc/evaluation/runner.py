"""From task files to tasks: find the YAMLs, pick each task's class, fit its config to the model."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from glmc.errors import GlmcError
from glmc.evaluation.config import TaskConfigError, TaskType, field_name, read_yaml, shown, task_type
from glmc.evaluation.tasks import GenerationTask, LanguageModelTask, MultiChoiceTask, Task

DEFAULT_CLASSES: dict[TaskType, type[Task]] = {
    TaskType.MULTICHOICE: MultiChoiceTask,
    TaskType.GENERATION: GenerationTask,
    TaskType.LANGUAGE_MODEL: LanguageModelTask,
}


def find_task_files(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for *.yaml and *.yml, sorted."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise GlmcError(f"{path}: no such task file or folder")
    if not found:
        raise GlmcError(f"no task files (*.yaml) in {', '.join(map(str, paths))}")
    return found


@dataclass
class LoadedTask:
    path: Path
    task_class: type[Task]
    config: object  # the task class's config
    notes: list[str]  # things the user should know: unknown fields, a length fitted to the model
    explicit_max_seq_length: bool = False


def read_task(path: Path) -> LoadedTask:
    """Parse a task file and resolve its class (the `module`, else the type's default class)."""
    raw = read_yaml(path)
    kind = task_type(raw, str(path))
    module = raw.get("module")
    if module:
        if not isinstance(module, str):
            raise TaskConfigError(f"{path}: field 'module' must be 'package.module.ClassName', got {shown(module)}")
        task_class = import_task_class(module, path)
    elif kind in DEFAULT_CLASSES:
        task_class = DEFAULT_CLASSES[kind]
    else:
        raise TaskConfigError(f"{path}: type '{kind.value}' needs a 'module' naming its task class")
    config, unknown = task_class.config_class.from_dict(raw, source=str(path))
    notes = [f"{path}: unknown field '{shown(name)[1:-1]}' ignored" for name in unknown]
    explicit = any(field_name(key) == "max_seq_length" for key in raw)
    return LoadedTask(path, task_class, config, notes, explicit)


@contextmanager
def searching(folders: list[Path]) -> Iterator[None]:
    """Imports inside also search `folders` (put first unless already on sys.path); sys.path is restored."""
    saved = list(sys.path)
    sys.path[:0] = [str(f) for f in folders if str(f) not in sys.path]
    try:
        yield
    finally:
        sys.path[:] = saved


def import_modules(names: list[str]) -> None:
    """Import user modules (from the current folder or sys.path) for what they register, e.g. metrics."""
    with searching([Path.cwd()]):
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as error:
                raise GlmcError(f"--import {name}: cannot be imported: {type(error).__name__}: {error}") from None


def import_task_class(name: str, source: Path) -> type[Task]:
    """"package.module.ClassName", importable from the current folder (as GLM-130B's `tasks.*`) or
    from the task file's folder."""
    module_name, _, class_name = name.rpartition(".")
    try:
        with searching([Path.cwd(), source.parent.resolve()]):
            module = importlib.import_module(module_name)
    except Exception as error:  # the module's own import errors included: report them in one line
        raise TaskConfigError(f"{source}: module {shown(module_name)} cannot be imported: "
                              f"{type(error).__name__}: {shown(str(error), 200)[1:-1]}") from None
    task_class = getattr(module, class_name, None)
    if not (isinstance(task_class, type) and issubclass(task_class, Task)):
        raise TaskConfigError(f"{source}: {shown(name)} is not a glmc.evaluation task class (subclass "
                              "MultiChoiceTask, GenerationTask, LanguageModelTask or Task)")
    return task_class


def fit_to_model(loaded: LoadedTask, max_sequence_length: int) -> None:
    """A task may not ask for longer sequences than the model's positions reach."""
    config = loaded.config
    if config.max_seq_length <= max_sequence_length:
        return
    try:
        loaded.config = dataclasses.replace(config, max_seq_length=max_sequence_length)
    except ValueError as error:
        raise TaskConfigError(f"{loaded.path}: with the model's maximum sequence length "
                              f"{max_sequence_length}: {error}") from None
    if loaded.explicit_max_seq_length:  # the default (2048, GLM-130B's length) means "the model's"
        loaded.notes.append(f"{loaded.path}: max_seq_length {config.max_seq_length} exceeds the model's "
                            f"{max_sequence_length}; using {max_sequence_length}")
