"""Export the app's OpenAPI document as YAML to specs/003-llm-service/contracts/openapi.yaml (`make openapi`)."""

from __future__ import annotations

import sys

import yaml

from src.core.config import REPO_ROOT, Settings

CONTRACT_PATH = REPO_ROOT / "specs" / "003-llm-service" / "contracts" / "openapi.yaml"
HEADER = "# Generated from the app by `make openapi`; a test fails when this file drifts from the app.\n"


def render_openapi() -> str:
    from src.main import create_app

    # Fixed settings: the document must not depend on the environment it is generated in.
    app = create_app(Settings(_env_file=None, log_level="WARNING"))
    return HEADER + yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True, width=120)


def main() -> int:
    CONTRACT_PATH.parent.mkdir(parents=True, exist_ok=True)
    CONTRACT_PATH.write_text(render_openapi())
    print(f"wrote {CONTRACT_PATH.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
