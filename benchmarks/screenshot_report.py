"""Look at a report as a reader does: headless Chromium screenshots of an HTML page (the report, or the
page `dvc plots show` writes), offline.

    python benchmarks/screenshot_report.py reports/report.html --out /tmp/shots
    python benchmarks/screenshot_report.py dvc_plots/index.html --out /tmp/shots --height 2400

Writes <out>/<page>_top.png (the first screen) and <out>/<page>_tall.png (--height pixels of the page).
Needs a Chromium binary (Debian: `apt-get install chromium`; or --chromium PATH). The screenshots are
for looking at, not for the repository; --docs DIR also writes the first screen small (256 colours) as
DIR/<page>_top.png, the README's picture of the smoke run's report (docs/report_top.png).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium(given: str | None) -> str:
    path = given or next((p for p in map(shutil.which, CANDIDATES) if p), None)
    if not path:
        sys.exit(f"screenshot_report: no Chromium found (tried {', '.join(CANDIDATES)}): install it or pass --chromium")
    return path


def screenshot(chromium: str, page: Path, png: Path, width: int, height: int, timeout_s: float) -> None:
    """One headless screenshot. Chromium exits once the page has loaded (failed network fetches, e.g. a
    CDN offline, end quickly); the timeout is a generous ceiling, and its output is printed on failure."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        sys.exit(f"screenshot_report: Chromium did not finish within {timeout_s:.0f} s\n{e.stderr or ''}")
    if done.returncode != 0 or not png.exists():
        sys.exit(f"screenshot_report: Chromium failed (exit {done.returncode}) on {page}\n{done.stderr}")
    print(f"{png} ({width}x{height}, {png.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path, help="an HTML file")
    ap.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--top", type=int, default=1000, help="height of the first-screen shot (pixels)")
    ap.add_argument("--height", type=int, default=6000, help="height of the tall shot (pixels)")
    ap.add_argument("--chromium", help="Chromium binary (default: the first of chromium, chromium-browser, ... on PATH)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per screenshot at most")
    ap.add_argument("--docs", type=Path, help="also write the first screen, small, as DOCS/<page>_top.png")
    args = ap.parse_args()
    if not args.page.is_file():
        sys.exit(f"screenshot_report: {args.page}: no such file (expected an HTML page)")
    chromium = find_chromium(args.chromium)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.page.stem
    for name, height in (("top", args.top), ("tall", args.height)):
        screenshot(chromium, args.page, args.out / f"{stem}_{name}.png", args.width, height, args.timeout)
    if args.docs:
        small = args.docs / f"{stem}_top.png"
        Image.open(args.out / f"{stem}_top.png").convert("RGB").quantize(256).save(small, optimize=True)
        print(f"{small} ({small.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
