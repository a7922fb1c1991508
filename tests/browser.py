"""Headless Chromium for tests and screenshots: Playwright for Python driving the system
browser (Debian's ``chromium`` package), never a browser that Playwright downloads.

``scripts/test.sh`` installs the package where it is missing; without it, a browser test
skips with a message, except in CI (``CI=true``), where a missing browser is an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Flags for a closed network: without the background-networking ones, Chromium keeps
# trying to reach Google's services and its connections are refused.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
INSTALL_HINT = "apt-get install chromium (Debian's package), or set BON_TRACKER_CHROMIUM=/path/to/chrome"


def find_chromium() -> str | None:
    """``$BON_TRACKER_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on the PATH, else None."""
    given = os.environ.get("BON_TRACKER_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_browser() -> str | None:
    """Why a browser test cannot run here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright; no `playwright install` needed)"
    if find_chromium() is None:
        return f"no Chromium found: {INSTALL_HINT}"
    return None


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 900, scale: float = 1.0) -> Iterator[Any]:
    """A Playwright page in a fresh headless Chromium profile (a temporary user-data-dir)."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise RuntimeError(f"no Chromium found: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="bon_tracker_chromium_") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": width, "height": height},
            device_scale_factor=scale,
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()
