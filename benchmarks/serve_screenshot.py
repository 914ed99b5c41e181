"""The README's picture of the page: start `resunet serve MODEL`, open the page in Debian's chromium (Playwright),
upload IMAGE, move the pointer over it, save a screenshot.

    python benchmarks/serve_screenshot.py MODEL IMAGE OUT.png [--width 1100]
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import start_server  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1100)
    args = parser.parse_args()
    process, url = start_server(args.model, [])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#model').textContent.includes('classes')")
            page.set_input_files("#file", args.image)
            page.wait_for_selector("body[data-segmented='1']", timeout=120_000)
            box = page.locator("#view").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
