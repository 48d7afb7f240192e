"""One registry shape for every choice made by name: allocations, scores, token selections,
quantizers, output formats and method shortcuts.

An entry is a frozen dataclass with a ``name``; its stage registers it where it is defined, and
the CLI's choices and :class:`~tamp_fx.config.PlanConfig`'s validation read the names from here.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Colour:
...     name: str
>>> COLOURS = Registry("colour")
>>> COLOURS.register(Colour("red")).name
'red'
>>> COLOURS.names(), COLOURS["red"]
(('red',), Colour(name='red'))
>>> COLOURS["blue"]
Traceback (most recent call last):
...
tamp_fx.errors.TampError: unknown colour 'blue': choose one of red
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from tamp_fx.errors import TampError


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Entries of one kind by name, in the order they were registered."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry`` under ``entry.name`` (once) and return it."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise TampError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
