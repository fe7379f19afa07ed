"""Sphinx extension of the pyro_efa docs: pages generated at build time from the code and data.

- API pages: one page per name in ``pyro_efa.__all__`` (``api/pyro_efa.<name>.rst``) and one page
  per module of ``conf.PUBLIC_MODULES`` (``api/<module>.rst``, ``automodule :members:``, which
  autodoc restricts to the module's ``__all__``). A module page leaves out the names re-exported
  at the top level (they have their own page) and links to them instead.
- Tutorials: ``tutorials/*.ipynb`` copied into ``docs/tutorials/`` (myst-nb renders them with
  their committed outputs; it never executes them, see ``nb_execution_mode`` in conf.py).
- Results: the ``benchmark-results`` directive renders every ``benchmarks/results/*.json`` as
  tables, reading whatever rows the files hold.

Generated files are written only when their content changes (incremental builds stay
incremental), and generated files that no longer correspond to a name, module or notebook are
removed. They are listed in ``.gitignore``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
API_DIR = DOCS / "api"
NB_SRC = ROOT / "tutorials"
NB_DST = DOCS / "tutorials"
RESULTS = ROOT / "benchmarks" / "results"

logger = logging.getLogger(__name__)

# the text of data names of pyro_efa.__all__ that cannot carry a documentation comment
_DATA_DOCS = {("pyro_efa", "__version__"): "The version of the installed package, read from its metadata."}


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _title(text: str) -> str:
    return f"{text}\n{'=' * len(text)}\n"


def _remove_stale(folder: Path, pattern: str, keep: set[str]) -> None:
    for path in folder.glob(pattern):
        if path.name not in keep:
            path.unlink()


# ------------------------------------------------------------------------------------------------
# API pages
def _is_data(obj: Any) -> bool:
    """Neither a class nor a function (nor a module): a value, a type alias."""
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj))


def toplevel_names() -> list[str]:
    """The names of ``pyro_efa.__all__`` that get a page of their own (classes and functions)."""
    import pyro_efa

    return [name for name in pyro_efa.__all__ if not _is_data(getattr(pyro_efa, name))]


def toplevel_data() -> list[str]:
    """The names of ``pyro_efa.__all__`` that are data (documented on the API index page)."""
    import pyro_efa

    return [name for name in pyro_efa.__all__ if _is_data(getattr(pyro_efa, name))]


def _analyzer(module_name: str) -> ModuleAnalyzer | None:
    try:
        analyzer = ModuleAnalyzer.for_module(module_name)
        analyzer.analyze()
    except PycodeError:
        return None
    return analyzer


def _data_doc(module_name: str, name: str) -> tuple[str | None, str]:
    """The documentation comment (``#: ...`` above the assignment, or a string below it) of the
    data ``<module_name>.<name>``, read in the pyro_efa module that assigns it (the data may be
    re-exported), or None if it has none; and the name of that module."""
    if (module_name, name) in _DATA_DOCS:
        return _DATA_DOCS[(module_name, name)], module_name
    obj = getattr(importlib.import_module(module_name), name)
    where = module_name
    for other_name, other in sorted(sys.modules.items()):
        if not other_name.startswith("pyro_efa") or getattr(other, name, None) is not obj:
            continue
        analyzer = _analyzer(other_name)
        if analyzer is None:
            continue
        if ("", name) in analyzer.attr_docs:
            return "\n".join(analyzer.attr_docs[("", name)]).strip(), other_name
        if _assigns(analyzer.code, name):
            where = other_name
    return None, where


def _data_directives(module_name: str, names: list[str]) -> list[str]:
    """``py:data`` entries for data names of ``module_name.__all__``, with the documentation
    comment of the module that assigns them; a warning for each that has none."""
    lines = []
    for name in names:
        doc, where = _data_doc(module_name, name)
        if doc is None:
            logger.warning(
                f"{sys.modules[where].__file__}: {module_name}.{name} has no documentation: add a "
                f"comment '#: ...' above its assignment in {where}"
            )
            doc = ""
        lines += [f".. py:data:: {name}", f"   :module: {module_name}", ""]
        lines += [f"   {line}" for line in doc.splitlines()] + [""]
    return lines


def _undocumented_data(module_name: str) -> list[str]:
    """The data names of the module's ``__all__`` that autodoc leaves out: autodoc documents
    module data only with a documentation comment in that very module, so a re-exported value
    or one without a comment would silently be missing. Names with a top-level entry are left
    to it."""
    import pyro_efa

    module = importlib.import_module(module_name)
    analyzer = _analyzer(module_name)
    own = {n for (ns, n) in analyzer.attr_docs if ns == ""} if analyzer is not None else set()
    return [
        name
        for name in getattr(module, "__all__", ())
        if _is_data(getattr(module, name))
        and name not in own
        and not (name in pyro_efa.__all__ and getattr(pyro_efa, name) is getattr(module, name))
    ]


def _assigns(source: str, name: str) -> bool:
    """Whether ``source`` assigns ``name`` at module level (not only imports it)."""
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def reexported(module_name: str) -> list[str]:
    """The names of ``module_name.__all__`` that ``pyro_efa.__all__`` re-exports (same object)."""
    import pyro_efa

    module = importlib.import_module(module_name)
    return sorted(
        name
        for name in getattr(module, "__all__", ())
        if name in pyro_efa.__all__ and getattr(pyro_efa, name) is getattr(module, name)
    )


def generate_api_pages(app: Sphinx) -> None:
    import pyro_efa

    modules = list(app.config.efa_public_modules)
    API_DIR.mkdir(exist_ok=True)
    keep = set()
    for name in toplevel_names():
        page = f"pyro_efa.{name}.rst"
        keep.add(page)
        obj = getattr(pyro_efa, name)
        defined = getattr(obj, "__module__", None)
        where = f"\nDefined in :mod:`{defined}`.\n" if defined in modules else ""
        text = f"{_title(f'pyro_efa.{name}')}\n.. currentmodule:: pyro_efa\n\n"
        if isinstance(obj, type):
            text += f".. autoclass:: {name}\n   :members:\n   :show-inheritance:\n"
        else:
            text += f".. autofunction:: {name}\n"
        text += where
        _write_if_changed(API_DIR / page, text)
    for module_name in modules:
        page = f"{module_name}.rst"
        keep.add(page)
        text = _title(module_name)
        text += f"\n.. automodule:: {module_name}\n   :members:\n   :show-inheritance:\n"
        data = _undocumented_data(module_name)
        if data:
            text += "\n" + "\n".join(_data_directives(module_name, data))
        shared = reexported(module_name)
        if shared:
            refs = ", ".join(f":obj:`pyro_efa.{name}`" for name in shared)
            text += f"\nAlso in this module, documented at the top level: {refs}.\n"
        _write_if_changed(API_DIR / page, text)
    _remove_stale(API_DIR, "pyro_efa*.rst", keep)
    _write_if_changed(API_DIR / "_generated.inc", _api_index(modules))


def _api_index(modules: list[str]) -> str:
    """The lists of the API index page (included by ``api/index.rst``)."""

    names = toplevel_names()
    lines = [".. currentmodule:: pyro_efa", "", "Top level: ``pyro_efa``", "-" * 23, ""]
    lines += [".. automodule:: pyro_efa", "   :no-members:", "", ".. autosummary::", ""]
    lines += [f"   {name}" for name in names]
    lines += [""]
    lines += _data_directives("pyro_efa", toplevel_data())
    lines += ["Modules", "-------", "", ".. currentmodule:: None", "", ".. autosummary::", ""]
    lines += [f"   {module}" for module in modules]
    lines += ["", ".. toctree::", "   :hidden:", ""]
    lines += [f"   pyro_efa.{name}" for name in names] + [f"   {module}" for module in modules]
    return "\n".join(lines) + "\n"


def skip_reexported(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    """On a module page, skip the members that have a top-level page of their own."""
    if what != "module":
        return None
    import pyro_efa

    if name in pyro_efa.__all__ and getattr(pyro_efa, name, None) is obj:
        return True
    return None


_CODE_OBJECTS = {"function", "class", "exception", "method", "property", "classmethod", "staticmethod"}


def warn_undocumented(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Warn about a public function, class, method or property without a docstring (the API
    reference would show its signature and nothing else)."""
    if what not in _CODE_OBJECTS or not name.startswith("pyro_efa") or any(line.strip() for line in lines):
        return
    target = getattr(obj, "fget", None) or getattr(obj, "__func__", None) or obj
    try:
        path = inspect.getsourcefile(target)
        line = inspect.getsourcelines(target)[1]
        where = f"{path}:{line}: "
    except (TypeError, OSError):
        where = ""
    logger.warning(f"{where}{name} has no docstring")


# ------------------------------------------------------------------------------------------------
# tutorials
def copy_notebooks(app: Sphinx) -> None:
    NB_DST.mkdir(exist_ok=True)
    keep = set()
    for src in sorted(NB_SRC.glob("*.ipynb")):
        keep.add(src.name)
        dst = NB_DST / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
    _remove_stale(NB_DST, "*.ipynb", keep)


# ------------------------------------------------------------------------------------------------
# results tables
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value or abs(value) >= 1e4 or value == int(value) and abs(value) >= 1e3:
            return f"{value:.0f}" if value == value else "nan"
        return f"{value:.5g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> nodes.table:
    table = nodes.table(classes=["efa-results"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for _ in header:
        group += nodes.colspec(colwidth=1)
    thead = nodes.thead()
    group += thead
    tbody = nodes.tbody()
    group += tbody
    for target, cells in ((thead, [header]), (tbody, rows)):
        for cells_of_row in cells:
            row = nodes.row()
            for text in cells_of_row:
                row += nodes.entry("", nodes.paragraph(text=text))
            target += row
    return table


def _records_tables(records: list[dict]) -> list[nodes.table]:
    """Tables of a list of records: consecutive records that share a key with the table before
    go into it (columns: the union of their keys, in order of appearance); a record that shares
    none starts a new table; a table of a single record is written as field / value rows."""
    groups: list[list[dict]] = []
    for record in records:
        if groups and set(record) & set().union(*groups[-1]):
            groups[-1].append(record)
        else:
            groups.append([record])
    tables = []
    for group in groups:
        if len(group) == 1:
            tables.append(_table(["field", "value"], _flatten(group[0])))
            continue
        columns: list[str] = []
        for record in group:
            columns += [key for key in record if key not in columns]
        tables.append(_table(columns, [[_cell(record.get(key)) for key in columns] for record in group]))
    return tables


def _flatten(value: dict, prefix: str = "") -> list[list[str]]:
    rows = []
    for key, item in value.items():
        if isinstance(item, dict):
            rows += _flatten(item, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", _cell(item)])
    return rows


def results_nodes(data: Any) -> list[nodes.Node]:
    """Tables for one JSON document: a list of records is one table; a mapping gives a table of
    its scalar fields and one table per list of records it holds."""
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return list(_records_tables(data))
    if isinstance(data, dict):
        out: list[nodes.Node] = []
        scalars = {k: v for k, v in data.items() if not _is_records(v)}
        if scalars:
            out.append(_table(["field", "value"], _flatten(scalars)))
        for key, value in data.items():
            if _is_records(value):
                out.append(nodes.rubric(text=key))
                out += _records_tables(value)
        return out
    return [nodes.paragraph(text=_cell(data))]


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _md_title(json_path: Path) -> str:
    """The first heading of the Markdown report beside the JSON file, or the file's name."""
    md = json_path.with_suffix(".md")
    if md.exists():
        for line in md.read_text().splitlines():
            match = re.match(r"#+\s+(.*)", line)
            if match:
                return match.group(1).strip()
    return json_path.stem


class BenchmarkResults(SphinxDirective):
    """``.. benchmark-results::``: a section per ``benchmarks/results/*.json`` file, with its tables."""

    has_content = False
    option_spec = {"glob": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        pattern = self.options.get("glob", "*.json")
        out: list[nodes.Node] = []
        paths = sorted(RESULTS.glob(pattern))
        if not paths:
            return [self.state.document.reporter.warning(f"no results match {RESULTS / pattern}")]
        for path in paths:
            self.env.note_dependency(str(path))
            section = nodes.section(ids=[nodes.make_id(f"results-{path.stem}")])
            section += nodes.title(text=_md_title(path))
            relative = path.relative_to(ROOT).as_posix()
            section += nodes.paragraph(
                "", "", nodes.Text("From "), nodes.literal(text=relative), nodes.Text(".")
            )
            section += results_nodes(json.loads(path.read_text()))
            out.append(section)
        return out


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("efa_public_modules", [], "env")
    app.connect("builder-inited", generate_api_pages)
    app.connect("builder-inited", copy_notebooks)
    app.connect("autodoc-skip-member", skip_reexported)
    app.connect("autodoc-process-docstring", warn_undocumented)
    app.add_directive("benchmark-results", BenchmarkResults)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
