"""Keep FastAPI from importing all of `pydantic.v1` only to learn that nothing uses it.

FastAPI refuses pydantic.v1 models, and to recognise one it imports `pydantic.v1` (1.4 MiB resident, per process
and per worker) while it builds the first route, even when nothing else ever imports it. A v1 model can only exist
once `pydantic.v1` has been imported, so while it is absent from `sys.modules` the answer is already "no". That is
the check proposed upstream (fastapi/fastapi#16374); until FastAPI has it, `skip_unused_pydantic_v1_import()`
puts it in front of FastAPI's two predicates. Once `pydantic.v1` is imported anywhere, FastAPI's own check runs
unchanged, so v1 models are still rejected (tests/unit/test_fastapi_compat.py holds both halves).

The predicates are private. If a FastAPI release renames or drops them, nothing is patched: requests behave as
FastAPI intends and only the 1.4 MiB comes back, which that test reports.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

PYDANTIC_V1 = "pydantic.v1"

# (module, predicate) pairs FastAPI 0.120+ consults: the route builder reaches `is_pydantic_v1_model_class`
# through `annotation_is_pydantic_v1` in `_compat.shared`; `jsonable_encoder` imported the instance check by name.
_PREDICATES = (
    ("fastapi._compat.shared", "is_pydantic_v1_model_class"),
    ("fastapi.encoders", "is_pydantic_v1_model_instance"),
)


def _only_once_pydantic_v1_is_imported(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def guarded(obj: Any) -> bool:
        return PYDANTIC_V1 in sys.modules and check(obj)

    guarded.__wrapped__ = check  # type: ignore[attr-defined]
    return guarded


def skip_unused_pydantic_v1_import() -> list[str]:
    """Guard FastAPI's pydantic.v1 checks; idempotent. Returns the predicates now guarded, as `module.name`."""
    guarded: list[str] = []
    for module_name, attribute in _PREDICATES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        check = getattr(module, attribute, None)
        if not callable(check):
            continue
        if not hasattr(check, "__wrapped__"):
            setattr(module, attribute, _only_once_pydantic_v1_is_imported(check))
        guarded.append(f"{module_name}.{attribute}")
    return guarded
