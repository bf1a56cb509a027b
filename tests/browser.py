"""Opening a page in a real headless browser (Debian's chromium, driven by Playwright) and reading what it shows."""

from __future__ import annotations

import os
import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a sandboxed machine: no sandbox, no GPU, and no background traffic to Google's hosts.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def available() -> bool:
    """Whether the browser and its driver are installed."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM)


def open_page(index_html: str, screenshot: str, width: int = 1280, queries: dict | None = None) -> dict:
    """Loads a local page in headless chromium (a fresh profile), screenshots the whole page, and reads it.

    Args:
        queries: ``{name: JavaScript expression}`` evaluated in the loaded page; their values are returned.

    Returns:
        ``{"requests": [url, ...], "images": [(src, loaded, natural width), ...],
        "counts": {name: text}, "text": visible text, "height": page height in px,
        "console": [console errors and uncaught exceptions], "queries": {name: value}}``.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})  # a new, empty profile
            requests, console = [], []
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: console.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: console.append(str(error)))
            page.goto("file://" + os.path.abspath(index_html), wait_until="load")
            page.screenshot(path=screenshot, full_page=True)
            images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
            counts = page.evaluate("Object.fromEntries([...document.querySelectorAll('[data-count]')]"
                                   ".map(e => [e.dataset.count, e.innerText.trim()]))")
            text = page.evaluate("document.body.innerText")
            height = page.evaluate("document.body.scrollHeight")
            answers = {name: page.evaluate(expression) for name, expression in (queries or {}).items()}
        finally:
            browser.close()
    return {"requests": requests, "images": [tuple(image) for image in images], "counts": counts, "text": text,
            "height": height, "console": console, "queries": answers}
