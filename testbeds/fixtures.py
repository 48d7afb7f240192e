"""The trained fixtures by name (``tamp-fx fixture --kind``): each one's ``model`` module
(``WEIGHTS``, the committed trained parts; ``build_fixture(out, overwrite=)``) and ``data`` module
(``write_conversations(out, n, overwrite=)``, calibration from its training distribution)."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from tamp_fx.registry import Registry
from tamp_fx.testbeds.fixture import data as data1
from tamp_fx.testbeds.fixture import model as model1
from tamp_fx.testbeds.fixture2 import data as data2
from tamp_fx.testbeds.fixture2 import model as model2


@dataclass(frozen=True)
class Fixture:
    name: str
    model: ModuleType
    data: ModuleType


FIXTURES: Registry[Fixture] = Registry("fixture")
FIXTURES.register(Fixture("llava", model1, data1))          # fixture 1: LLaVA, 16 image tokens
FIXTURES.register(Fixture("next", model2, data2))           # fixture 2: LLaVA-NeXT, anyres, 88 image tokens
