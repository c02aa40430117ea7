"""JSON-safe values and one text formatter for numbers, shared by the report and metric writers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that :func:`json.dumps` writes as strict JSON.

    Non-finite floats become None (null), numpy scalars and arrays become Python values, tuples
    become lists; dicts and lists are converted recursively. The input is not modified.
    """
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_value(value: Any, spec: str = ".3f", missing: str = "n/a") -> str:
    """Text of one value: ``missing`` for None and non-finite floats, ``true``/``false`` for booleans,
    floats with the format ``spec``, anything else with ``str``."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return missing
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else missing
    return str(value)
