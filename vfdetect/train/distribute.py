"""``tf.distribute`` strategies and this process's role in a (possibly multi-worker) run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from vfdetect.errors import VfdetectError
from vfdetect.train.config import STRATEGIES, TrainConfigError


@dataclass(frozen=True)
class WorkerRole:
    """Who this process is in a (possibly multi-worker) run."""

    is_chief: bool = True
    task_type: str = "chief"
    task_id: int = 0
    num_workers: int = 1

    @property
    def name(self) -> str:
        return f"{self.task_type}-{self.task_id}"


def _tf_config() -> dict[str, Any] | None:
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise VfdetectError(f"TF_CONFIG is not valid JSON: {error}") from None
    if not isinstance(value, dict) or "cluster" not in value:
        raise VfdetectError("TF_CONFIG must hold a 'cluster' entry")
    return value


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy for ``name`` (see the module docstring for ``"auto"``).

    Call it before any other TensorFlow operation of the process: multi-worker collectives can only
    be configured at program start.
    """
    if name not in STRATEGIES:
        raise TrainConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "auto":
        if _tf_config() is not None:
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multiworker":
        if _tf_config() is None:
            raise VfdetectError("the multiworker strategy needs TF_CONFIG describing the cluster")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def worker_role(strategy: tf.distribute.Strategy) -> WorkerRole:
    """This process's role: the chief writes the run folder, other workers a subfolder of it."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return WorkerRole()
    resolver = strategy.cluster_resolver
    task_type, task_id = str(resolver.task_type), int(resolver.task_id)
    jobs = resolver.cluster_spec().as_dict()
    num_workers = sum(len(tasks) for job, tasks in jobs.items() if job in ("chief", "worker"))
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in jobs)
    return WorkerRole(is_chief=is_chief, task_type=task_type, task_id=task_id, num_workers=num_workers)
