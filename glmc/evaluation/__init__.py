"""GLM-130B's zero-shot evaluation: YAML tasks of multiple choice, generation and language modelling."""

from glmc.evaluation.config import (
    GenerationTaskConfig,
    LanguageModelTaskConfig,
    MultiChoiceTaskConfig,
    TaskConfig,
    TaskConfigError,
    TaskType,
)
from glmc.evaluation.datasets import DataError
from glmc.evaluation.metrics import METRICS, get_metric, register_metric
from glmc.evaluation.runner import LoadedTask, find_task_files, fit_to_model, import_modules, read_task
from glmc.evaluation.tasks import (
    FileResult,
    GenerationTask,
    LanguageModelTask,
    MultiChoiceTask,
    Quiet,
    Task,
    TaskResult,
)

__all__ = [
    "DataError", "FileResult", "GenerationTask", "GenerationTaskConfig", "LanguageModelTask",
    "LanguageModelTaskConfig", "LoadedTask", "METRICS", "MultiChoiceTask", "MultiChoiceTaskConfig", "Quiet",
    "Task", "TaskConfig", "TaskConfigError", "TaskResult", "TaskType", "find_task_files", "fit_to_model",
    "get_metric", "import_modules", "read_task", "register_metric",
]
