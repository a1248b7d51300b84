"""Launching Debian's Chromium under Playwright for the page's browser tests and benchmark.

Playwright's own browser download is never used (``playwright install`` needs network access the
test machines do not have): the system ``chromium`` package is driven instead. Playwright is an
optional test dependency, so it is imported by the callers, not here.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

__all__ = ["CHROMIUM_ARGS", "chromium_path", "launch_chromium"]

CHROMIUM_ARGS = (
    "--no-sandbox",  # runs as root in CI; the page under test is our own
    "--disable-gpu",
    "--disable-background-networking",  # no update checks, no safe-browsing fetches
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
)


def chromium_path() -> str | None:
    """``$WEFT_CHROMIUM``, else the first of chromium / chromium-browser on PATH, else None."""
    explicit = os.environ.get("WEFT_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


async def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium browser from an ``async_playwright()`` instance."""
    path = chromium_path()
    if path is None:
        raise FileNotFoundError("no chromium executable (apt-get install chromium)")
    return await playwright.chromium.launch(
        executable_path=path, headless=True, args=list(CHROMIUM_ARGS)
    )
