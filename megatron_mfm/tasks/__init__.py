"""The 15 MfM tasks as condition builders, their masks and degradations, and the task mixture."""

from megatron_mfm.tasks.builders import TASKS, Clip, TaskSample, build_task_sample
from megatron_mfm.tasks.mixture import TaskMixture, TaskMixtureConfig

__all__ = ["TASKS", "Clip", "TaskMixture", "TaskMixtureConfig", "TaskSample", "build_task_sample"]
