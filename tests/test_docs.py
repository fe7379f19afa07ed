"""The documentation site (docs/): built without a warning, every public name and module has an
anchor, every internal link and image resolves, the figures show in a browser.

The HTML is the one ``.ci/run`` builds (``$PYRO_EFA_DOCS_HTML``), or, when that variable is not
set, a build of this test into a temporary folder with the README's command (``-W``: a warning
fails it). The tests that need the HTML skip when the ``docs`` extra is not installed; the
browser test skips when Chromium is not installed.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

import pyro_efa

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_PACKAGES = ("sphinx", "myst_nb", "furo", "sphinxarg")


def _conf_value(name: str) -> object:
    """A literal assigned in docs/conf.py (read without importing Sphinx)."""
    for node in ast.parse((DOCS / "conf.py").read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


PUBLIC_MODULES: list[str] = _conf_value("PUBLIC_MODULES")  # type: ignore[assignment]
NOT_DOCUMENTED: dict[str, str] = _conf_value("NOT_DOCUMENTED")  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------
# no build needed
def _submodules() -> list[str]:
    names = set()
    roots = [pyro_efa]
    try:
        roots.append(importlib.import_module("pyro_efa.models"))
    except ImportError:  # not installed: a source tree that is only on sys.path
        pass
    for package in roots:
        names.add(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.add(info.name)
    return sorted(names - {"pyro_efa"})


def _covered_by_parent(module_name: str) -> bool:
    """A submodule of a documented package whose public names the package re-exports."""
    parent = module_name.rpartition(".")[0]
    if parent not in PUBLIC_MODULES:
        return False
    module, package = importlib.import_module(module_name), importlib.import_module(parent)
    names = getattr(module, "__all__", None)
    return names is not None and all(
        n in getattr(package, "__all__", ()) and getattr(package, n) is getattr(module, n) for n in names
    )


def test_every_public_module_is_in_the_api_reference():
    """A new module pyro_efa.X must be added to PUBLIC_MODULES in docs/conf.py (or, with the reason,
    to NOT_DOCUMENTED)."""
    missing = [
        name
        for name in _submodules()
        if not any(part.startswith("_") for part in name.split("."))
        and name not in PUBLIC_MODULES
        and name not in NOT_DOCUMENTED
        and not _covered_by_parent(name)
    ]
    assert not missing, f"add these modules to PUBLIC_MODULES in docs/conf.py: {missing}"
    for name in PUBLIC_MODULES:
        importlib.import_module(name)  # a listed module that is gone fails here, with its name


# ------------------------------------------------------------------------------------------------
# the built HTML
class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])  # type: ignore[arg-type]
        if tag in ("a", "link") and a.get("href"):
            self.links.append(a["href"])  # type: ignore[arg-type]
        if tag == "script" and a.get("src"):
            self.links.append(a["src"])  # type: ignore[arg-type]
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])  # type: ignore[arg-type]


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="session")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("PYRO_EFA_DOCS_HTML")
    if given:
        path = Path(given).resolve()
        assert (path / "index.html").exists(), f"PYRO_EFA_DOCS_HTML={given} holds no built site"
        return path
    missing = [name for name in DOCS_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed (no {', '.join(missing)}): pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("docs") / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-6000:]}"
    return out


@pytest.fixture(scope="session")
def pages(html: Path) -> dict[Path, _Page]:
    return {path: _parse(path) for path in sorted(html.rglob("*.html"))}


def _all_ids(pages: dict[Path, _Page]) -> set[str]:
    return set().union(*(page.ids for page in pages.values()))


def test_every_public_name_has_an_anchor(html, pages):
    ids = _all_ids(pages)
    missing = [f"pyro_efa.{name}" for name in pyro_efa.__all__ if f"pyro_efa.{name}" not in ids]
    missing += [f"module-{name}" for name in PUBLIC_MODULES if f"module-{name}" not in ids]
    for module_name in PUBLIC_MODULES:  # each module's __all__, or at the top level if re-exported
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if f"{module_name}.{name}" not in ids and f"pyro_efa.{name}" not in ids:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"no anchor in the built HTML for {missing}"
    # the page of pyro_efa.fit is its own
    assert "pyro_efa.fit" in pages[html / "api" / "pyro_efa.fit.html"].ids


def _resolve(page: Path, url: str) -> tuple[Path, str] | None:
    """The file and fragment an internal link points to; None for an external one."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or url.startswith(("mailto:", "javascript:", "data:")):
        return None
    target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
    if target.is_dir():
        target = target / "index.html"
    return target, unquote(parts.fragment)


def test_every_internal_link_resolves(html, pages):
    broken = []
    for page, parsed in pages.items():
        for url in parsed.links:
            resolved = _resolve(page, url)
            if resolved is None:
                continue
            target, fragment = resolved
            where = f"{page.relative_to(html)}: {url}"
            if not target.is_file():
                broken.append(f"{where} (no file)")
            elif (
                fragment
                and target.suffix == ".html"
                and target in pages
                and fragment not in pages[target].ids
            ):
                broken.append(f"{where} (no anchor '{fragment}')")
    assert not broken, "broken links:\n" + "\n".join(broken[:50])


def test_every_image_exists_and_the_tutorials_show_their_figures(html, pages):
    broken = []
    for page, parsed in pages.items():
        for src in parsed.images:
            resolved = _resolve(page, src)
            if resolved is not None and (not resolved[0].is_file() or resolved[0].stat().st_size == 0):
                broken.append(f"{page.relative_to(html)}: {src}")
    assert not broken, f"images that do not exist: {broken}"
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    assert len(notebooks) >= 5
    for notebook in notebooks:
        nb = nbformat.read(notebook, as_version=4)
        figures = sum(
            "image/png" in output.get("data", {})
            for cell in nb.cells
            if cell.cell_type == "code"
            for output in cell.outputs
        )
        page = html / "tutorials" / f"{notebook.stem}.html"
        assert page.exists(), f"{notebook.name} is not rendered"
        shown = [src for src in pages[page].images if src.endswith(".png")]
        assert len(shown) == figures, (
            f"{page.name} shows {len(shown)} of the {figures} figures of {notebook.name}"
        )


def test_cli_reference_lists_every_command_and_option(html):
    from pyro_efa.cli import build_parser

    text = (html / "cli.html").read_text(encoding="utf-8")
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.choices and hasattr(a, "_name_parser_map")]
    for name, sub in subparsers.choices.items():
        assert f'id="{name}"' in text or f">{name}<" in text, f"pyro-efa {name} is missing"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):  # sphinx-argparse leaves out -h/--help
                continue
            for option in action.option_strings:
                assert option in text, f"pyro-efa {name} {option} is missing from the CLI reference"


def test_results_tables_come_from_the_json_files(html, pages):
    page = html / "results.html"
    text = page.read_text(encoding="utf-8")
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert f"results-{path.stem}".replace("_", "-") in pages[page].ids, f"no section for {path.name}"
        data = json.loads(path.read_text())
        records = data if isinstance(data, list) else next(v for v in data.values() if isinstance(v, list))
        for key in records[0]:
            assert f"<p>{key}</p>" in text, f"column {key} of {path.name} is missing"
    reproduce = json.loads((ROOT / "benchmarks" / "results" / "reproduce.json").read_text())
    assert text.count("<tr") >= len(reproduce)


def test_changelog_and_model_pages(html):
    changelog = (html / "changelog.html").read_text(encoding="utf-8")
    for line in (ROOT / "CHANGELOG.md").read_text().splitlines():
        if line.startswith("## "):
            assert line[3:].strip() in changelog
    model = (html / "model.html").read_text(encoding="utf-8")
    for words in ("joint likelihood", "pseudo-likelihood", "Exponential family embeddings", "One-pass"):
        assert words in model


def test_chromium_shows_the_figures_and_the_navigation(html):
    spec = importlib.util.spec_from_file_location("browser_check", DOCS / "browser_check.py")
    browser = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(browser)
    binary = browser.chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    found = []
    images = 0
    for rel in browser.PAGES.values():
        report = browser.page_report(binary, html / rel)
        found += browser.problems(report, rel)
        images += len(report["images"])
    assert not found, found
    assert images > 0
