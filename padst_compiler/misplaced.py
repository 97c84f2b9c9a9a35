"""What the repository's root folders (``kernels/``, ``passes/``, ``training/``,
``integrations/``) become when Python finds them as top-level packages, because the
repository root is on ``sys.path`` (the current directory of ``python -c``, ``python -m``,
a REPL or a notebook started there).

They are subpackages of ``padst_compiler``; under a second name they would be a second copy
of the code, so any use is refused. A bare ``import`` must still succeed: libraries probe
for packages of the same name, and transformers imports any ``kernels`` it finds (the
Hub's kernels package) while importing its ``Trainer``, which then failed in such a
directory. The stand-in has no file and no version, which such probes read as a folder
shadowing a package that is not installed. Where a package of that name is installed
(transformers 5.25 depends on the Hub's ``kernels``), the import gives that package: the
root folder must not hide it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]  # the repository root, where the folders are


class MisplacedPackage(types.ModuleType):
    """A module whose every public attribute raises an ``ImportError`` naming the right import."""

    def __init__(self, name: str, proper: str):
        super().__init__(name)
        self._proper = proper

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") and attribute.endswith("__"):  # probes: __file__, __version__, __path__
            raise AttributeError(attribute)
        raise ImportError(f"this package must be imported as {self._proper}, not {self.__name__!r}; install the "
                          "project (pip install -e .) and import it through padst_compiler")


def installed_elsewhere(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of a package ``name`` installed on ``sys.path`` outside the repository root,
    or None (none, or a bare folder: a namespace package)."""
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    return None if spec is None or spec.origin is None else spec


def stand_in(name: str, proper: str) -> None:
    """Make the module being imported as ``name`` the package of that name installed
    elsewhere on ``sys.path`` if there is one, else a ``MisplacedPackage`` (the rest of the
    folder's ``__init__`` still runs, into the module object this discards)."""
    spec = installed_elsewhere(name)
    if spec is None:
        sys.modules[name] = MisplacedPackage(name, proper)
        return
    installed = importlib.util.module_from_spec(spec)
    sys.modules[name] = installed  # its own imports of name.<submodule> must find it
    spec.loader.exec_module(installed)
