"""Task classes (GLM-130B's evaluation/tasks.py): find the files, batch, predict, score.

A task's files are grouped by the config's `file_pattern` (group name -> glob
under the task's data folder); each file is a dataset scored on its own, and a
group is summarised by the max, median and sample-weighted average of its files.

A custom task (the YAML's `module`) subclasses one of these classes, overriding
`metrics`, `build_dataset` or `predict_batch` as GLM-130B's custom tasks do.
"""

from __future__ import annotations

import glob
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from glmc.errors import GlmcError
from glmc.evaluation.config import (
    GenerationTaskConfig,
    LanguageModelTaskConfig,
    MultiChoiceTaskConfig,
    TaskConfig,
)
from glmc.evaluation.datasets import GenerationDataset, LanguageModelDataset, MultiChoiceDataset, Vocabulary
from glmc.evaluation.metrics import Metric, get_metric
from glmc.evaluation.scoring import choice_log_probs, generate_text, window_losses
from glmc.generation.filling import tokenize_with_masks
from glmc.generation.strategies import BaseStrategy, BeamSearchStrategy


@dataclass
class FileResult:
    file: str  # relative to the task's data folder
    metrics: dict[str, Any]
    samples: int
    seconds: float


@dataclass
class TaskResult:
    name: str
    config: TaskConfig
    groups: dict[str, list[FileResult]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self, group: str) -> dict[str, dict[str, float | None]]:
        """Per numeric metric of the group: max, median and the average weighted by samples (None
        when no file has samples)."""
        files = self.groups[group]
        out = {}
        for name in files[0].metrics if files else ():
            values = [f.metrics[name] for f in files]
            if not all(isinstance(v, (int, float)) for v in values):
                continue
            weights = [f.samples for f in files]
            out[name] = {"max": float(np.max(values)), "median": float(np.median(values)),
                         "average": float(np.average(values, weights=weights)) if sum(weights) else None}
        return out

    def to_json(self) -> dict:
        config = asdict(self.config)
        config["type"] = self.config.type.value
        return {
            "name": self.name,
            "type": self.config.type.value,
            "config": config,
            "seconds": round(self.seconds, 3),
            "groups": {
                group: {
                    "files": {f.file: {"metrics": f.metrics, "samples": f.samples, "seconds": round(f.seconds, 3)}
                              for f in files},
                    "summary": self.summary(group),
                }
                for group, files in self.groups.items()
            },
        }


class ProgressBar(Protocol):
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class Listener(Protocol):
    """What a caller sees of an evaluation as it runs (the CLI prints it)."""

    def group_started(self, task: "Task", group: str) -> None: ...

    def progress(self, task: "Task", file: str, total: int) -> ProgressBar: ...

    def file_finished(self, task: "Task", result: FileResult) -> None: ...


class Quiet:
    """A Listener that shows nothing."""

    class _Bar:
        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    def group_started(self, task, group) -> None:
        pass

    def progress(self, task, file, total) -> ProgressBar:
        return self._Bar()

    def file_finished(self, task, result) -> None:
        pass


class Task:
    """Base class: `build_dataset(path)` and `predict_batch(samples)` are what a type defines."""

    config_class: ClassVar[type[TaskConfig]] = TaskConfig

    def __init__(self, model, config: TaskConfig, data_root: Path, source: str = "task"):
        self.model, self.config, self.source = model, config, source
        self.root = Path(data_root) / config.path
        special, tokenizer = model.special_tokens(), model.tokenizer
        self.vocab = Vocabulary(
            special, model.config.vocab_size,
            # Masks written in text are the commands, as in `glmc run` prompts.
            (lambda text: tokenize_with_masks(text, tokenizer.tokenize, special)) if tokenizer else None,
            tokenizer.detokenize if tokenizer else None)

    @property
    def metrics(self) -> dict[str, Metric]:
        return {name: get_metric(name, self.source) for name in self.config.metrics}

    def file_groups(self) -> dict[str, list[str]]:
        """Group -> data files (relative to the task's folder), sorted."""
        if not self.root.is_dir():
            raise GlmcError(f"{self.source}: data folder {self.root} does not exist (--data-path joined with "
                            f"path '{self.config.path}')")
        groups = {name: sorted(p for p in glob.glob(pattern, root_dir=self.root, recursive=True)
                               if (self.root / p).is_file())
                  for name, pattern in self.config.file_pattern.items()}
        if not any(groups.values()):
            patterns = ", ".join(repr(p) for p in self.config.file_pattern.values())
            raise GlmcError(f"{self.source}: no data files match {patterns} under {self.root}")
        return groups

    def build_dataset(self, path: Path):
        raise NotImplementedError

    def predict_batch(self, samples: list) -> list:
        raise NotImplementedError

    def predictions_for_metrics(self, predictions: list, dataset) -> list:
        return predictions

    def evaluate(self, listener: Listener = Quiet()) -> TaskResult:
        metrics = self.metrics  # unknown names fail before any work
        groups = self.file_groups()
        result = TaskResult(self.config.name, self.config)
        start = time.perf_counter()
        for group, files in groups.items():
            if not files:
                continue
            listener.group_started(self, group)
            result.groups[group] = []
            for file in files:
                file_start = time.perf_counter()
                dataset = self.build_dataset(self.root / file)
                predictions = []
                size = self.config.micro_batch_size
                bar = listener.progress(self, file, len(dataset))
                try:
                    for first in range(0, len(dataset), size):
                        indices = range(first, min(first + size, len(dataset)))
                        predictions += self.predict_batch([dataset.sample(i) for i in indices])
                        bar.update(len(indices))
                finally:
                    bar.close()
                predictions = self.predictions_for_metrics(predictions, dataset)
                scores = {name: metric(predictions, dataset.data) for name, metric in metrics.items()}
                done = FileResult(file, scores, len(dataset), time.perf_counter() - file_start)
                result.groups[group].append(done)
                listener.file_finished(self, done)
        result.seconds = time.perf_counter() - start
        return result


class MultiChoiceTask(Task):
    config_class = MultiChoiceTaskConfig

    def build_dataset(self, path: Path) -> MultiChoiceDataset:
        return MultiChoiceDataset(path, self.config, self.vocab)

    def predict_batch(self, samples) -> list[int]:
        return [int(np.argmax(scores)) for scores in choice_log_probs(self.model, samples)]


class GenerationTask(Task):
    config_class = GenerationTaskConfig

    def __init__(self, model, config: GenerationTaskConfig, data_root: Path, source: str = "task"):
        super().__init__(model, config, data_root, source)
        if config.sampling_strategy == "BeamSearchStrategy":
            self.strategy = BeamSearchStrategy(config.num_beams, config.length_penalty,
                                               no_repeat_ngram_size=config.no_repeat_ngram_size,
                                               min_gen_length=config.min_gen_length, consider_end=True,
                                               deterministic=True)
        else:  # greedy, as GLM-130B's evaluation runs BaseStrategy
            self.strategy = BaseStrategy(temperature=1.0, top_k=1, top_p=0.0)

    def build_dataset(self, path: Path) -> GenerationDataset:
        return GenerationDataset(path, self.config, self.vocab)

    def predict_batch(self, samples) -> list[list[int]]:
        return generate_text(self.model, samples, self.strategy)

    def predictions_for_metrics(self, predictions: list[list[int]], dataset) -> list[str]:
        return [self.vocab.decode(p) for p in predictions]


class LanguageModelTask(Task):
    config_class = LanguageModelTaskConfig

    def build_dataset(self, path: Path) -> LanguageModelDataset:
        return LanguageModelDataset(path, self.config, self.vocab)

    def predict_batch(self, samples) -> list[float]:
        return window_losses(self.model, samples)
