"""Task configs: the YAML fields of GLM-130B's evaluation/configs.py.

A task YAML names the task, its type (`mul`, `gen`, `lm`), its data folder relative
to the data path, and options. Fields may be spelt with dashes or underscores
(`micro-batch-size` = `micro_batch_size`), as GLM-130B's own task files mix both.
Unknown fields are reported back to the caller (they are ignored, as GLM-130B
ignores them, but a misspelt option should not go unnoticed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from glmc.errors import GlmcError
from glmc.fileio import parse_yaml, read_text


class TaskType(Enum):
    MULTICHOICE = "mul"
    GENERATION = "gen"
    LANGUAGE_MODEL = "lm"
    OTHER = "other"  # only with a `module` that supplies the task class


class TaskConfigError(GlmcError):
    pass


DEFAULT_FILE_PATTERN = "**/*.json*"


@dataclass(frozen=True)
class TaskConfig:
    name: str  # task name
    type: TaskType
    path: str  # data folder, relative to the data path
    module: str | None = None  # "package.module.ClassName" of a custom task class
    metrics: tuple[str, ...] = ()
    use_task_mask: bool = False  # [gMASK] instead of [MASK]
    use_multitask_encoding: bool = False  # multiple choice: choice positions count on from the mask
    unidirectional: bool = False  # causal attention over the context (needs use_task_mask)
    max_seq_length: int = 2048
    file_pattern: dict[str, str] = field(default_factory=lambda: {"all": DEFAULT_FILE_PATTERN})  # group -> glob
    micro_batch_size: int = 1

    def __post_init__(self):
        if self.unidirectional and not self.use_task_mask:
            raise ValueError("unidirectional attention needs use_task_mask: true ([MASK] is bidirectional)")
        if self.max_seq_length < 4:
            raise ValueError(f"max_seq_length must be at least 4, got {self.max_seq_length}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {self.micro_batch_size}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"

    @classmethod
    def from_yaml_file(cls, path: str | Path) -> tuple["TaskConfig", list[str]]:
        """The config and the fields of the file this class does not know."""
        return cls.from_dict(read_yaml(Path(path)), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "task") -> tuple["TaskConfig", list[str]]:
        values, unknown = _normalized(raw, cls, source)
        for name in ("name", "type", "path"):
            if name not in values:
                raise TaskConfigError(f"{source}: the required field '{name}' is missing")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = _convert(f.name, values[f.name], source)
        try:
            return cls(**kwargs), unknown
        except (TypeError, ValueError) as error:
            raise TaskConfigError(f"{source}: {error}") from None


@dataclass(frozen=True, repr=False)
class MultiChoiceTaskConfig(TaskConfig):
    metrics: tuple[str, ...] = ("Accuracy",)


@dataclass(frozen=True, repr=False)
class GenerationTaskConfig(TaskConfig):
    metrics: tuple[str, ...] = ("EM", "F1")
    sampling_strategy: str = "BaseStrategy"  # greedy; or BeamSearchStrategy
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    min_gen_length: int = 0
    max_gen_length: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.sampling_strategy not in ("BaseStrategy", "BeamSearchStrategy"):
            raise ValueError(f"sampling_strategy must be BaseStrategy or BeamSearchStrategy, "
                             f"got {shown(self.sampling_strategy)}")
        if self.num_beams < 1 or self.max_gen_length < 1 or self.min_gen_length < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("num_beams and max_gen_length must be at least 1, min_gen_length and "
                             "no_repeat_ngram_size at least 0")
        if self.max_gen_length + 3 > self.max_seq_length:
            raise ValueError(f"max_gen_length {self.max_gen_length} leaves no room for a context in "
                             f"max_seq_length {self.max_seq_length}")


@dataclass(frozen=True, repr=False)
class LanguageModelTaskConfig(TaskConfig):
    metrics: tuple[str, ...] = ("PPL",)
    generation_length: int = 256  # tokens scored per window after the first

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.generation_length <= self.max_seq_length - 1:
            raise ValueError(f"generation_length must lie in [1, max_seq_length - 1 = {self.max_seq_length - 1}], "
                             f"got {self.generation_length}")


CONFIG_CLASSES: dict[TaskType, type[TaskConfig]] = {
    TaskType.MULTICHOICE: MultiChoiceTaskConfig,
    TaskType.GENERATION: GenerationTaskConfig,
    TaskType.LANGUAGE_MODEL: LanguageModelTaskConfig,
    TaskType.OTHER: TaskConfig,
}


MAX_TASK_FILE_BYTES = 1 << 20  # GLM-130B's task files are a few hundred bytes


def read_yaml(path: Path) -> dict[str, Any]:
    """A task file: bounded in size, no key twice, nesting and aliases bounded (see `parse_yaml`)."""
    text = read_text(path, TaskConfigError, max_bytes=MAX_TASK_FILE_BYTES)
    raw = parse_yaml(text, str(path), TaskConfigError)
    if not isinstance(raw, dict):
        raise TaskConfigError(f"{path}: a task file must be a mapping of fields (name, type, path, ...)")
    return raw


def shown(value: Any, limit: int = 60) -> str:
    """repr of a value read from a file, cut to `limit` characters for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def task_type(raw: dict[str, Any], source: str) -> TaskType:
    values, _ = _normalized(raw, TaskConfig, source)
    if "type" not in values:
        raise TaskConfigError(f"{source}: the required field 'type' is missing")
    return _convert("type", values["type"], source)


def field_name(key: Any) -> str:
    """The field a YAML key names: dashes and underscores alike."""
    return str(key).replace("-", "_")


def _normalized(raw: dict[str, Any], cls: type[TaskConfig], source: str) -> tuple[dict[str, Any], list[str]]:
    known = {f.name for f in dataclasses.fields(cls)}
    values, unknown = {}, []
    for key, value in raw.items():
        name = field_name(key)
        if name in values:
            raise TaskConfigError(f"{source}: the field '{shown(name)[1:-1]}' is given twice (dash and underscore "
                                  "spelling)")
        if name in known:
            values[name] = value
        else:
            unknown.append(str(key))
    return values, unknown


def _convert(name: str, value: Any, source: str) -> Any:
    """Check and convert one YAML value to the field's type."""
    def bad(expected: str) -> TaskConfigError:
        return TaskConfigError(f"{source}: field '{name}' must be {expected}, got {shown(value)}")

    if name == "type":
        try:
            return TaskType(value)
        except ValueError:
            raise TaskConfigError(f"{source}: unknown task type {shown(value)}: choose from "
                                  f"{', '.join(repr(t.value) for t in TaskType)}") from None
    if name in ("name", "path", "sampling_strategy"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("a string")
        return str(value)
    if name == "module":
        if value is None:
            return None
        if not isinstance(value, str) or "." not in value:
            raise bad("'package.module.ClassName'")
        return value
    if name == "metrics":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise bad("a list of metric names")
        return tuple(value)
    if name in ("use_task_mask", "use_multitask_encoding", "unidirectional"):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if name in ("max_seq_length", "micro_batch_size", "num_beams", "no_repeat_ngram_size", "min_gen_length",
                "max_gen_length", "generation_length"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        return value
    if name == "length_penalty":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        return float(value)
    if name == "file_pattern":
        if isinstance(value, str):
            return {"all": value}
        if (not isinstance(value, dict) or not value
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise bad("a glob pattern or a mapping of group names to glob patterns")
        return dict(value)
    return value  # fields a custom config class adds: taken as given
