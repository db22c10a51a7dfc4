"""One registry for every kind of named, pluggable object: methods, tasks, analyses, architectures.

An entry is either the object itself or a lazy ``"module:attribute"`` string that is imported on
first use (the pattern of lm-eval's ``api/registry.py``): listing the built-ins costs no import and
needs no import inside a function, so no module has to import its plug-ins to know their names.
A registry can also *discover* its entries: every module of the packages it names is imported on
first use and registers itself there, so adding a task or an analysis is one new module.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from prunelens.errors import PrunelensError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind, in registration order; unknown names fail in one line with a
    "did you mean" and the full list."""

    def __init__(self, kind: str, lazy: dict[str, str] | None = None, discover: Iterable[str] = ()):
        self.kind = kind
        self._entries: dict[str, T | str] = dict(lazy or {})
        self._discover = tuple(discover)
        self._discovered = not self._discover

    def register(self, name: str, obj: T | str) -> T | str:
        """Add ``obj`` (or a lazy ``"module:attribute"``) under ``name``; a second registration of the
        same name is a programming error (a real object may take the place of its lazy entry)."""
        current = self._entries.get(name)
        if current is not None and current is not obj and not isinstance(current, str):
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj
        return obj

    def _load_plugins(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # before importing: the modules register into this registry
        for pkg_name in self._discover:
            pkg = importlib.import_module(pkg_name)
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{pkg_name}.{info.name}")

    def _resolve(self, name: str) -> T:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._entries[name] = obj
            return obj
        return entry

    def names(self) -> list[str]:
        self._load_plugins()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def get(self, name: str) -> T:
        if name not in self:
            raise PrunelensError(self.unknown(name))
        return self._resolve(name)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def values(self) -> list[T]:
        return [self._resolve(n) for n in self.names()]

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._resolve(n)) for n in self.names()]

    def unknown(self, name: str) -> str:
        """The one-line error for a name that is not registered."""
        names = self.names()
        return f"unknown {self.kind} '{name}'{did_you_mean(name, names)} (known: {', '.join(names)})"


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, or ``""``: the one hint every unknown-name
    error (registries, recipe methods, sweep methods, paired tasks) gives."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
