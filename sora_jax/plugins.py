"""Finding plug-ins: the objectives and the evaluators are each a package whose modules
define one object under an agreed name; adding a module is all it takes to add one."""

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any


def discover(package: str, paths: Iterable[str], attribute: str, key: str) -> dict[str, Any]:
    """{getattr(found, key): found} for every module of `package` (at `paths`, its
    __path__) that defines `attribute`, sorted by that key."""
    found = {}
    for module in pkgutil.iter_modules(paths):
        plugin = getattr(importlib.import_module(f"{package}.{module.name}"), attribute, None)
        if plugin is not None:
            found[getattr(plugin, key)] = plugin
    return dict(sorted(found.items()))
