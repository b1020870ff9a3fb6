"""`GET /playground`: the static browser page for trying the chat API, served only with PLAYGROUND_ENABLED.

The page (`static/playground.html`) is one file with its CSS and JavaScript inline: no build step, no CDN, nothing
loaded from anywhere but this origin. Its Content-Security-Policy allows exactly the inline blocks the file holds,
by their SHA-256 (computed here from the file, so editing the page never needs a second edit), and network access
only to this origin (`connect-src 'self'`). The page holds no secret: the service key is typed into it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE_PATH = "/playground"
PAGE_RESOURCE = ("static", "playground.html")
# The page's inline blocks: `<script>` and `<style>` without attributes, so the hashes cover exactly their text.
_INLINE_BLOCK = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)
_DIRECTIVE_OF_BLOCK = {"script": "script-src", "style": "style-src"}
NO_SOURCE = "'none'"

router = APIRouter(tags=["playground"])


@dataclass(frozen=True)
class PlaygroundPage:
    html: str
    content_security_policy: str

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Security-Policy": self.content_security_policy,
            "X-Content-Type-Options": "nosniff",
            # The page's URL is nobody's business, and it is never framed (clickjacking of the key field).
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            # Always the page of the running version: it is small, and an old copy could speak an old contract.
            "Cache-Control": "no-cache",
        }


def content_security_policy(html: str) -> str:
    """Nothing by default; the page's own inline blocks by hash; images only as the data: URLs it attaches."""
    sources: dict[str, list[str]] = {directive: [] for directive in _DIRECTIVE_OF_BLOCK.values()}
    for match in _INLINE_BLOCK.finditer(html):
        digest = base64.b64encode(hashlib.sha256(match.group(2).encode()).digest()).decode()
        sources[_DIRECTIVE_OF_BLOCK[match.group(1)]].append(f"'sha256-{digest}'")
    directives = [
        "default-src 'none'",
        *(f"{directive} {' '.join(hashes or [NO_SOURCE])}" for directive, hashes in sources.items()),
        "img-src data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
    return "; ".join(directives)


@lru_cache(maxsize=1)
def load_page() -> PlaygroundPage:
    """The page and its policy, read from the package on first use (never at import)."""
    html = files("src.api").joinpath(*PAGE_RESOURCE).read_text(encoding="utf-8")
    return PlaygroundPage(html=html, content_security_policy=content_security_policy(html))


# Not in the OpenAPI document: it is a page for people, not an operation for generated clients, and the committed
# contract stays the same whether the playground is on or off.
@router.get(PAGE_PATH, include_in_schema=False)
async def playground() -> HTMLResponse:
    page = load_page()
    return HTMLResponse(page.html, headers=page.headers)
