"""Export the app's OpenAPI document as YAML to specs/003-llm-service/contracts/openapi.yaml (`make openapi`)."""

from __future__ import annotations

import json
import sys
from typing import Any

from src.core.config import REPO_ROOT, Settings

CONTRACT_PATH = REPO_ROOT / "specs" / "003-llm-service" / "contracts" / "openapi.yaml"
HEADER = "# Generated from the app by `make openapi`; a test fails when this file drifts from the app.\n"


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    # JSON strings are valid YAML double-quoted scalars.
    return json.dumps(str(value))


def to_yaml(value: Any, indent: int = 0) -> str:
    """A small, deterministic YAML emitter for JSON-shaped data (no PyYAML dependency for one file)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{_scalar(key)}:\n{to_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{_scalar(key)}: {to_yaml(item).strip()}\n")
        return "".join(lines)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        for item in value:
            nested = to_yaml(item, indent + 1)
            lines.append(f"{pad}- {nested.lstrip()}")
        return "".join(lines)
    return pad + _scalar(value) + "\n"


def render_openapi() -> str:
    from src.main import create_app

    # Fixed settings: the document must not depend on the environment it is generated in.
    app = create_app(Settings(_env_file=None, log_level="WARNING"))
    return HEADER + to_yaml(app.openapi())


def main() -> int:
    CONTRACT_PATH.parent.mkdir(parents=True, exist_ok=True)
    CONTRACT_PATH.write_text(render_openapi())
    print(f"wrote {CONTRACT_PATH.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
