"""`GET /api/v1/llm/usage`: the usage ledger, summed in the database by key, model, user or day (operators)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BeforeValidator

from src.api.openapi import error_doc
from src.core.errors import ErrorCode, ServiceError
from src.core.ledger import Ledger, LedgerUnavailableError
from src.models.llm import UsageReport, UsageRow

DEFAULT_PERIOD = timedelta(days=30)
EARLIEST = datetime.min.replace(tzinfo=UTC)
GroupBy = Literal["key", "model", "user", "day"]
_NUMBER = re.compile(r"[+-]?\d+(\.\d*)?")


def _iso_only(value: object) -> object:
    """The document promises ISO 8601 date-times: a bare number (a Unix time to pydantic) is not one."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        raise ValueError("expected an ISO 8601 date-time such as 2026-01-31T00:00:00Z")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_only)]

router = APIRouter(prefix="/llm", tags=["operators"])


@router.get(
    "/usage",
    responses={
        401: error_doc("unauthorized: an ADMIN_API_KEYS key is required (open only when the service has no keys)"),
        422: error_doc("validation_error: bad `from`, `to` or `group_by`"),
        503: error_doc("ledger_unavailable: the ledger's database cannot answer now"),
    },
    summary="Usage from the ledger, grouped by key, model, user or day",
    response_model_exclude_unset=True,
)
async def usage(
    request: Request,
    group_by: GroupBy = "key",
    start: Annotated[IsoDateTime | None, Query(alias="from", description="ISO 8601; default 30 days ago")] = None,
    end: Annotated[IsoDateTime | None, Query(alias="to", description="ISO 8601, exclusive; default now")] = None,
) -> UsageReport:
    """Calls, errors, cancellations and tokens per group, for calls that ended in [from, to) (empty when `to` is
    not after `from`)."""
    end = _utc(end) if end is not None else datetime.now(UTC)
    start = _utc(start) if start is not None else max(end, EARLIEST + DEFAULT_PERIOD) - DEFAULT_PERIOD
    if end <= start:
        return UsageReport(rows=[])
    ledger: Ledger = request.state.ledger
    try:
        rows = await ledger.usage(start=start, end=end, group_by=group_by)
    except LedgerUnavailableError as exc:
        raise ServiceError(
            ErrorCode.LEDGER_UNAVAILABLE, "The usage ledger's database cannot answer now.", status_code=503
        ) from exc
    return UsageReport(rows=[UsageRow.model_validate(row) for row in rows])


def _utc(moment: datetime) -> datetime:
    """Times without an offset are UTC, like the ledger's."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
