"""A small registry of named plug-ins (scoring backends, selection strategies).

Entries are "module:attr" strings imported on first use, so a process that never asks for the vLLM
backend never imports vLLM (and the gateway never imports torch).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, str | T] = {}
        self._families: dict[str, str | Callable[[str], T]] = {}

    def register(self, name: str, target: str | T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = target

    def register_family(self, prefix: str, factory: str | Callable[[str], T]) -> None:
        """Parameterized names `prefix:<arg>`: `factory(arg)` builds the entry (e.g. `source:gpt4`)."""
        if prefix in self._families:
            raise ValueError(f"{self.kind} family {prefix!r} is registered twice")
        self._families[prefix] = factory

    def names(self) -> list[str]:
        return sorted(self.in_order())

    def in_order(self) -> list[str]:
        """The names in registration order, families last as `prefix:<name>`."""
        return [*self._entries, *(f"{p}:<name>" for p in self._families)]

    @contextlib.contextmanager
    def temporary(self, name: str, target: str | T) -> Iterator[None]:
        """`name` registered for the block only (a test's extra plug-in), removed after it."""
        self.register(name, target)
        try:
            yield
        finally:
            del self._entries[name]

    def __contains__(self, name: object) -> bool:
        if name in self._entries:
            return True
        return isinstance(name, str) and name.partition(":")[0] in self._families and bool(name.partition(":")[2])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        prefix, colon, arg = name.partition(":")
        if colon and name not in self._entries and prefix in self._families:
            if not arg:
                raise UnknownName(f"{self.kind} {name!r}: give a name after {prefix + ':'!r}")
            factory = self._families[prefix]
            if isinstance(factory, str):
                module, _, attr = factory.partition(":")
                factory = getattr(importlib.import_module(module), attr)
                self._families[prefix] = factory
            return factory(arg)
        try:
            target = self._entries[name]
        except KeyError:
            near = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UnknownName(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})") from None
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target  # type: ignore[return-value]
