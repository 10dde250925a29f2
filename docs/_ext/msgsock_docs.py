"""A small Sphinx extension for the msgsock reference.

``.. msgsock-exports:: msgsock`` writes one entry per name in the module's ``__all__``
that points to where the name is documented in full.  The top-level package
re-exports the core, so its page lists the names without repeating every docstring.
Each ``msgsock.NAME`` is registered as an *alias* in the Python domain: it is a valid
target (``:class:`msgsock.FrameFormat```) and is in ``objects.inv``, but a short
reference such as ``:exc:`Timeout``` in a docstring still resolves to the one full
entry, ``msgsock.exceptions.Timeout``, instead of being ambiguous.

A class split over modules (a large class and a private base holding one part of it:
``msgsock.auth._Handshake``, ``msgsock._lifecycle.Lifecycle``) is documented whole.
:func:`document_private_bases` sets autodoc's ``inherited-members`` to every class
name except the private bases of msgsock, so a class's entry lists what it inherits
from those and nothing it inherits from a public class (documented there) or from
Python; :func:`hide_private_bases` leaves the private base out of the entry's "Bases".

Two autodoc hooks make "every name in ``__all__`` has an entry" hold:

- ``autodoc-skip-member`` keeps a module's ``__all__`` names even when they have no
  docstring (autodoc skips undocumented members by default; for a constant that would
  mean no entry at all);
- ``autodoc-process-docstring`` gives a re-exported constant the docstring it has in
  the submodule that defines it (``msgsock.callback.FD_READ`` is defined in
  ``msgsock.callback.socket``; autodoc reads attribute docstrings from the source of
  the module it documents, so it would otherwise find none).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from typing import Any, cast

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.domains.python import PythonDomain
from sphinx.pycode import ModuleAnalyzer, PycodeError
from sphinx.util.docutils import SphinxDirective

# Where a re-exported name is documented in full, searched in this order.
DOCUMENTED = (
    "msgsock.exceptions",
    "msgsock.framing",
    "msgsock.protocol",
    "msgsock.serving",
    "msgsock.stages",
    "msgsock.archive",
    "msgsock.proxy",
    "msgsock.auth",
)


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def _home(name: str, obj: Any, here: str) -> str | None:
    for module_name in DOCUMENTED:
        if module_name == here:
            continue
        module = importlib.import_module(module_name)
        if name in getattr(module, "__all__", ()) and getattr(module, name, None) is obj:
            return module_name
    return None


class ExportsDirective(SphinxDirective):
    """List a module's ``__all__`` with links to the full entries."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        module_name = self.arguments[0]
        module = importlib.import_module(module_name)
        lines: list[str] = []
        entries: list[tuple[str, str, list[str]]] = []
        for name in module.__all__:
            if name.startswith("__"):  # __version__ has its own entry
                continue
            obj = getattr(module, name)
            home = _home(name, obj, module_name)
            if inspect.isclass(obj):
                kind = "exception" if issubclass(obj, BaseException) else "class"
                role = "exc" if kind == "exception" else "class"
                summary = _summary(obj)
            elif inspect.isfunction(obj):
                kind, role, summary = "function", "func", _summary(obj)
            else:
                kind, role, summary = "data", "data", ""
            signature = f"{name}()" if kind == "function" else name
            lines.append(f".. py:{kind}:: {signature}")
            lines.append(f"   :module: {module_name}")
            lines.append("   :no-index:")
            if kind == "data" and home is None:
                lines.append(f"   :value: {obj!r}")
            lines.append("")
            if summary:
                lines.append(f"   {summary}")
                lines.append("")
            if home is not None:
                lines.append(f"   Re-exported from :mod:`{home}`: see :{role}:`{home}.{name}`.")
                lines.append("")
            entries.append((name, kind, lines))
            lines = []
        domain = cast(PythonDomain, self.env.get_domain("py"))
        result: list[nodes.Node] = []
        for name, kind, entry in entries:
            node_id = f"{module_name}.{name}"
            result.append(nodes.target("", "", ids=[node_id]))
            domain.note_object(node_id, kind, node_id, aliased=True, location=self.get_location())
            container = nodes.container()
            self.state.nested_parse(StringList(entry, source=f"<exports of {module_name}>"), 0, container)
            result.extend(container.children)
        return result


def _public(name: str, obj: Any) -> bool:
    """Whether ``obj`` is bound to ``name`` in the ``__all__`` of an imported msgsock module."""
    for module_name, module in list(sys.modules.items()):
        in_all = name in getattr(module, "__all__", ())
        if module_name.split(".")[0] == "msgsock" and in_all and getattr(module, name, None) is obj:
            return True
    return False


def keep_public_members(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    """Never skip a module member that the module lists in ``__all__``."""
    if what == "module" and skip and _public(name, obj):
        return False
    return None


def _attribute_doc(module_name: str, name: str) -> list[str]:
    try:
        analyzer = ModuleAnalyzer.for_module(module_name)
        analyzer.analyze()
    except PycodeError:
        return []
    return list(analyzer.attr_docs.get(("", name), []))


def fill_reexported_data_doc(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Give a re-exported constant the docstring of its defining submodule."""
    if what != "data" or any(line.strip() for line in lines):
        return
    package, _, attr = name.rpartition(".")
    for module_name in sorted(sys.modules):
        if module_name.startswith(package + ".") and getattr(sys.modules[module_name], attr, None) is obj:
            doc = _attribute_doc(module_name, attr)
            if doc:
                lines[:] = doc
                return


class ConstantsDirective(SphinxDirective):
    """Entries for the constants of ``__all__`` that ``automodule`` leaves out.

    autodoc documents a module-level constant only when the module's own source gives
    it a docstring.  This lists the others with ``autodata`` (whose docstring then
    comes from the defining submodule, see :func:`fill_reexported_data_doc`), so a
    constant that gains a docstring moves to the automodule entry by itself, never
    twice.
    """

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        module_name = self.arguments[0]
        module = importlib.import_module(module_name)
        try:
            analyzer = ModuleAnalyzer.for_module(module_name)
            analyzer.analyze()
            documented = {name for namespace, name in analyzer.attr_docs if namespace == ""}
        except PycodeError:
            documented = set()
        lines: list[str] = []
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) or name in documented:
                continue
            lines += [f".. autodata:: {module_name}.{name}", ""]
        if not lines:
            return []
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"<constants of {module_name}>"), 0, container)
        return container.children


def _private_base(cls: type) -> bool:
    """A class of msgsock that no public module's ``__all__`` names (``msgsock.auth._Handshake``)."""
    if cls.__module__.split(".")[0] != "msgsock":
        return False
    for module_name, module in list(sys.modules.items()):
        parts = module_name.split(".")
        if parts[0] != "msgsock" or any(part.startswith("_") for part in parts):
            continue
        if cls.__name__ in getattr(module, "__all__", ()) and getattr(module, cls.__name__, None) is cls:
            return False
    return True


def hide_private_bases(app: Sphinx, name: str, obj: Any, options: Any, bases: list[type]) -> None:
    """Show a class's public bases: a private base of msgsock is replaced by its own bases."""
    shown: list[type] = []
    pending = list(bases)
    while pending:
        base = pending.pop(0)
        if _private_base(base):
            pending[:0] = list(base.__bases__)
        elif base not in shown:
            shown.append(base)
    bases[:] = shown


def document_private_bases(app: Sphinx, config: Config) -> None:
    """Document what a class inherits from a private base of msgsock as the class's own.

    autodoc's ``inherited-members`` names the classes whose members a subclass does
    not repeat.  Every class met in the MRO of a class of the library is named, except
    the private bases of msgsock: a member a class gets from one of those is documented
    with the class, one from a public class or from Python is not.
    """
    import msgsock

    names: set[str] = set()
    for info in pkgutil.walk_packages(msgsock.__path__, "msgsock."):
        if info.name.startswith("msgsock.app") or info.name.startswith("msgsock._"):
            continue  # the applications are not in the reference (and need their extras)
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if inspect.isclass(value):
                names.update(base.__name__ for base in value.__mro__ if not _private_base(base))
    options = dict(config.autodoc_default_options)
    options["inherited-members"] = ",".join(sorted(names))
    config.autodoc_default_options = options


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("msgsock-exports", ExportsDirective)
    app.add_directive("msgsock-constants", ConstantsDirective)
    app.connect("config-inited", document_private_bases)
    app.connect("autodoc-process-bases", hide_private_bases)
    app.connect("autodoc-skip-member", keep_public_members)
    app.connect("autodoc-process-docstring", fill_reexported_data_doc)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
