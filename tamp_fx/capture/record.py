"""The one recorder of what a model's parts are called with: the decoder layers of a Hugging Face
model or of an exported program, or a whole language decoder (``tamp-fx export``).

:func:`recording` swaps the named submodules for :class:`Recorder` stand-ins that append each
call's ``(args, kwargs)`` to one list, and puts the originals back afterwards, whatever happens.
A stand-in answers with ``respond(module, args, kwargs)`` (by default the first argument: hidden
states pass through, so the layers themselves may be on the meta device). With ``stop`` the last
one ends the forward pass (:class:`Stop`, caught by :func:`run`), since nothing after it is needed.

>>> net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2))
>>> with recording(net, ["1"]) as calls:
...     _ = net(torch.ones(1, 2))
>>> [tuple(args[0].shape) for args, kwargs in calls]
[(1, 2)]
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Call = tuple[tuple[Any, ...], dict[str, Any]]          # (positional, keyword) arguments of one call


class Stop(Exception):
    """Raised by the last recorder of a :func:`recording` with ``stop``: the rest of the forward is not needed."""


def pass_through(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    return args[0]


class Recorder(torch.nn.Module):
    """Stands in for ``module``: records its call, then answers with ``respond`` or stops."""

    def __init__(self, module: torch.nn.Module, calls: list[Call], respond: Callable, stop: bool) -> None:
        super().__init__()
        self.calls, self.respond, self.stop = calls, respond, stop
        object.__setattr__(self, "original", module)          # not a submodule: its parameters are not ours

    def __getattr__(self, name: str) -> Any:
        """Whatever else the model asks of the module it called (``get_input_embeddings``, ``config``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if self.stop:
            raise Stop
        return self.respond(self.original, args, kwargs)


def _put(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@contextlib.contextmanager
def recording(root: torch.nn.Module, names: Sequence[str], *, respond: Callable = pass_through,
              stop: bool = False) -> Iterator[list[Call]]:
    """Record the calls of ``root``'s submodules ``names`` (in call order, one list); with ``stop``
    the last of them ends the forward pass. The submodules are restored on exit."""
    originals = [root.get_submodule(n) for n in names]
    calls: list[Call] = []
    try:
        for i, (name, module) in enumerate(zip(names, originals)):
            _put(root, name, Recorder(module, calls, respond, stop and i + 1 == len(names)))
        yield calls
    finally:
        for name, module in zip(names, originals):
            _put(root, name, module)


def run(forward: Callable, *args: Any, **kwargs: Any) -> None:
    """``forward(*args, **kwargs)``, ended early without error by a recorder's :class:`Stop`."""
    try:
        forward(*args, **kwargs)
    except Stop:
        pass
