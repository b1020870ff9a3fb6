"""The pydantic.v1 import guard: the service never loads pydantic.v1, and v1 models are still refused."""

# No `from __future__ import annotations` here: FastAPI must see the local v1 class itself, not its name.
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import PydanticV1NotSupportedError

from src.core.fastapi_compat import skip_unused_pydantic_v1_import

BACKEND_DIR = Path(__file__).resolve().parents[2]


def test_the_guard_covers_both_fastapi_checks_and_is_idempotent() -> None:
    # An empty list here means a FastAPI upgrade renamed the private predicates: the guard is inert and each
    # process pays for pydantic.v1 again. Re-read fastapi/_compat/shared.py and update core/fastapi_compat.py.
    first = skip_unused_pydantic_v1_import()
    assert first == [
        "fastapi._compat.shared.is_pydantic_v1_model_class",
        "fastapi.encoders.is_pydantic_v1_model_instance",
    ]
    import fastapi._compat.shared as shared

    wrapped_once = shared.is_pydantic_v1_model_class
    assert skip_unused_pydantic_v1_import() == first
    assert shared.is_pydantic_v1_model_class is wrapped_once


def test_a_running_service_never_imports_pydantic_v1() -> None:
    # A fresh interpreter: this test process may have imported pydantic.v1 through other libraries.
    script = textwrap.dedent(
        """
        import sys
        from fastapi.testclient import TestClient
        from src.core.config import Settings
        from src.main import create_app

        settings = Settings(_env_file=None, openai_api_key="sk-test", log_level="ERROR")
        with TestClient(create_app(settings)) as client:
            assert client.get("/health").status_code == 200
            assert client.post("/api/v1/llm/chat", json={"messages": []}).status_code == 422
            assert client.get("/openapi.json").status_code == 200
        print("pydantic.v1" in sys.modules)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        cwd=BACKEND_DIR,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


def test_pydantic_v1_models_are_still_refused_once_pydantic_v1_is_imported() -> None:
    skip_unused_pydantic_v1_import()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pydantic import v1

    class LegacyBody(v1.BaseModel):
        text: str

    app = FastAPI()
    with pytest.raises(PydanticV1NotSupportedError):

        @app.post("/legacy")
        async def legacy(body: LegacyBody) -> None:
            raise AssertionError("never registered")

    with pytest.raises(PydanticV1NotSupportedError):
        jsonable_encoder(LegacyBody(text="old"))
