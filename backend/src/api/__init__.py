"""HTTP layer: routers, dependencies and middleware.

Every route is declared under this package, so the guard below is in place before FastAPI builds the first one
(building a route is what would import `pydantic.v1`; see core/fastapi_compat.py).
"""

from src.core.fastapi_compat import skip_unused_pydantic_v1_import

skip_unused_pydantic_v1_import()
