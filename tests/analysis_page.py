"""Driving the analysis page in Debian's Chromium with playwright: shared by tests/test_analysis_ui.py and by the
README's screenshots (`python tests/analysis_page.py URL OUT.png [--prompt TEXT] [--batch-task builtin:plan]`).

The browser is always the system one at /usr/bin/chromium (`make browser` installs it); playwright never
downloads one of its own.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parent.parent
WAIT_MS = 180_000
"""How long an analysis may run before the page is given up on."""


def ensure_chromium() -> str | None:
    """None when Chromium is there (installing it with `make browser` if needed), else why it is not."""
    if not CHROMIUM.exists() and shutil.which("make"):
        subprocess.run(["make", "-s", "browser"], cwd=ROOT, timeout=900, check=False)
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM}, and `make browser` could not install Debian's chromium here"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (make install)"
    return None


def launch(p):
    """Chromium from `p` (a sync_playwright() instance), headless, with nothing reaching outside."""
    return p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)


def compare_single(
    page, base: str, prompt: str, *, tokens: int = 24, temperature: float = 0.0, top_k: int = 5
):
    """Loads the page, lets the student answer `prompt`, and returns the /v1/compare body the page received."""
    page.goto(base + "/ui")
    page.wait_for_function("document.querySelector('#student').options.length > 0")
    page.fill("#prompt", prompt)
    page.fill("#gen-tokens", str(tokens))
    page.fill("#gen-temp", str(temperature))
    page.fill("#top-k", str(top_k))
    with page.expect_response(lambda r: r.url.endswith("/v1/compare"), timeout=WAIT_MS) as info:
        page.click("#compare-btn")
    body = info.value.json()
    _wait(page, "#tokens .tok")
    return body


def _wait(page, selector: str) -> None:
    """Until `selector` shows, or the page shows an error (raised as RuntimeError with its text)."""
    page.wait_for_selector(f"{selector}, #error:not([hidden])", timeout=WAIT_MS)
    if page.is_visible("#error"):
        raise RuntimeError(f"the page shows an error: {page.inner_text('#error')}")


def hover_token(page, index: int) -> str:
    """Hovers token `index` and returns the text of the tooltip."""
    page.hover(f"#tokens .tok >> nth={index}")
    page.wait_for_selector("#tip:not([hidden])")
    return page.inner_text("#tip")


def run_batch(page, task: str, *, count: int, max_new_tokens: int, lengths: str) -> None:
    """The batch view: KL by position, then the rescue curve, on `count` prompts of `task`."""
    page.click("button[data-view=batch]")
    page.select_option("#source", task)
    page.fill("#count", str(count))
    page.fill("#max-new", str(max_new_tokens))
    page.click("#batch-btn")
    _wait(page, "#kl-chart rect.bar")
    page.fill("#lengths", lengths)
    page.click("#rescue-btn")
    _wait(page, "#rescue-chart circle")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="Server root, e.g. http://127.0.0.1:8000")
    ap.add_argument("out", type=Path, help="Screenshot of the single-prompt view (PNG).")
    ap.add_argument("--prompt", default="What is 2+3?")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--hover", type=int, default=3, help="Token whose tooltip is shown.")
    ap.add_argument(
        "--batch-task", help="Also a screenshot of the batch view (OUT with -batch) on this task."
    )
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lengths", default="0,1,2,4,8,16,32")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        compare_single(page, args.url, args.prompt, tokens=args.tokens)
        hover_token(page, args.hover)
        page.screenshot(path=str(args.out))
        if args.batch_task:
            run_batch(
                page,
                args.batch_task,
                count=args.count,
                max_new_tokens=args.max_new_tokens,
                lengths=args.lengths,
            )
            page.screenshot(path=str(args.out.with_name(args.out.stem + "-batch.png")))
        browser.close()


if __name__ == "__main__":
    main()
