"""Look at the built documentation in headless Chromium (Debian's ``chromium`` package).

Usage, after building the HTML (``python -m sphinx -W --keep-going -b html docs docs/_build/html``)::

    python docs/browser_check.py [--html docs/_build/html] [--out docs/screenshots]

It takes screenshots of the index, the API page of ``pyro_efa.fit``, one tutorial page and the
model page (``index.png``, ``api_fit.png``, ``tutorial.png``: a tall window, so that the
tutorial's first figures are in it, with Pillow installed also cut into ``tutorial_1.png``,
``tutorial_2.png``, ...; ``model.png``), then loads the same pages in Chromium and reports, for
every image, whether the browser decoded it (``naturalWidth > 0``), how many formulas MathJax
typeset (it is served from ``_static``: no network needed), and the number of links of the
navigation sidebar. It exits with 1 when an image is broken, a formula is not typeset or a page
has no navigation. ``tests/test_docs.py`` runs the same
check where ``chromium`` is installed.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PAGES = {
    "index": "index.html",
    "api_fit": "api/pyro_efa.fit.html",
    "tutorial": "tutorials/01_efa_in_ten_minutes.html",
    "model": "model.html",
}
# as the machine's own probe starts it: no sandbox as root, and none of Chromium's background
# connections (the machine has no network; they would only be refused)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str | None:
    """The Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(binary: str, args: list[str], timeout: float = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    return done.stdout


def screenshot(binary: str, page: Path, out: Path, width: int = 1400, height: int = 1000) -> None:
    """A PNG of the top ``height`` pixels of ``page`` (after its scripts ran: MathJax)."""
    args = [f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={out}"]
    _run(binary, [*args, page.as_uri()])


_PROBE = """<!doctype html><html><body>
<iframe id="page" src="{src}" style="width:1400px;height:1000px"></iframe>
<script>
document.getElementById("page").addEventListener("load", function () {{
  var win = this.contentWindow;
  var ready = win.MathJax && win.MathJax.startup ? win.MathJax.startup.promise : Promise.resolve();
  ready.then(function () {{ report(win.document); }});
}});
function report(doc) {{
  var images = Array.prototype.map.call(doc.images, function (img) {{
    return {{src: img.getAttribute("src"), width: img.naturalWidth, complete: img.complete}};
  }});
  var nav = doc.querySelectorAll(".sidebar-tree a.reference").length;
  var math = doc.querySelectorAll(".math").length;
  var typeset = doc.querySelectorAll("mjx-container").length;
  var out = document.createElement("pre");
  out.id = "report";
  out.textContent = JSON.stringify(
    {{title: doc.title, images: images, nav_links: nav, math: math, typeset: typeset}});
  document.body.appendChild(out);
}}
</script></body></html>
"""


def page_report(binary: str, page: Path) -> dict:
    """What Chromium sees of ``page``: its title, its images (``src``, decoded ``width``) and the
    number of links in the navigation sidebar. Uses ``--dump-dom`` on a probe page that frames it
    (``--allow-file-access-from-files`` lets the probe read the framed page)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(_PROBE.format(src=html.escape(page.as_uri())))
        dom = _run(
            binary,
            ["--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        )
    match = re.search(r'<pre id="report">(.*?)</pre>', dom, re.S)
    if not match:
        raise RuntimeError(f"Chromium did not load {page} (no report in the dumped DOM)")
    return json.loads(html.unescape(match.group(1)))


def problems(report: dict, page: str) -> list[str]:
    out = [f"{page}: image {img['src']} not shown" for img in report["images"] if img["width"] <= 0]
    if report["nav_links"] == 0:
        out.append(f"{page}: no navigation links")
    if report["typeset"] < report["math"]:
        out.append(f"{page}: {report['math'] - report['typeset']} of {report['math']} formulas not typeset")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=DOCS / "_build" / "html", help="built HTML")
    parser.add_argument("--out", type=Path, default=DOCS / "screenshots", help="screenshot folder")
    args = parser.parse_args(argv)
    binary = chromium()
    if binary is None:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    found: list[str] = []
    for name, rel in PAGES.items():
        page = args.html / rel
        if not page.exists():
            print(f"{page} does not exist: build the docs first", file=sys.stderr)
            return 2
        height = {"tutorial": 6000, "model": 2400}.get(name, 1000)
        shot = args.out / f"{name}.png"
        screenshot(binary, page, shot, height=height)
        report = page_report(binary, page)
        found += problems(report, rel)
        shown = sum(img["width"] > 0 for img in report["images"])
        print(
            f"{shot}: {report['title']!r}, {shown}/{len(report['images'])} images shown, "
            f"{report['typeset']}/{report['math']} formulas typeset, {report['nav_links']} navigation links"
        )
    _tile(args.out / "tutorial.png")
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


def _tile(path: Path, height: int = 1500) -> None:
    """Cut a tall screenshot into tiles that an image viewer shows at a readable size."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        for k, top in enumerate(range(0, image.height, height), start=1):
            image.crop((0, top, image.width, min(top + height, image.height))).save(
                path.with_name(f"{path.stem}_{k}.png")
            )


if __name__ == "__main__":
    os.environ.setdefault("LANG", "C.UTF-8")
    sys.exit(main())
