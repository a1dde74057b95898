"""Names a package hands on, loaded on first use (PEP 562): `import sdm` and `import sdm.data` then cost no torch,
so the command line answers `--help` and argument errors at once. Standard library only."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, homes: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, whose public name -> defining module is `homes` (a name that is
    the module's own last part, like "matching" -> "sdm.matching", is the module). A loaded value is kept in
    `namespace` (the package's globals), so each name is looked up once."""

    def getattr_(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(homes[name])
        value = module if module.__name__ == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *homes})

    return getattr_, dir_


__all__ = ["lazy_names"]
