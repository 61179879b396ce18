"""pytest-twisted's ensureDeferred decorator, typed for mypy --strict."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest_twisted

ensure_deferred: Callable[
    [Callable[..., Coroutine[Any, Any, None]]], Callable[..., Coroutine[Any, Any, None]]
] = pytest_twisted.ensureDeferred
