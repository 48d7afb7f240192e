"""The fixture's procedural scenes: reproducible, well-posed, balanced."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.testbeds.fixture import scenes


def _expected_answer(s: scenes.Sample) -> str:
    """The answer recomputed from the scene's objects, independently of the generator's choice."""
    q, objs = s.question, s.objects
    if s.task == "character":
        return s.character
    if s.task == "count":
        return str(len(objs))
    if s.task == "colour":
        shape = q.removeprefix("What colour is the ").removesuffix("?")
        matches = [o for o in objs if o.shape == shape]
        assert len(matches) == 1, "a colour question names a shape that appears exactly once"
        return matches[0].colour
    if s.task == "shape":
        colour = q.removeprefix("What shape is the ").removesuffix(" object?")
        matches = [o for o in objs if o.colour == colour]
        assert len(matches) == 1, "a shape question names a colour that appears exactly once"
        return matches[0].shape
    colour, shape = q.removesuffix(" on?").removesuffix("?").split()[-2:]
    matches = [o for o in objs if (o.colour, o.shape) == (colour, shape)]
    if s.task == "presence":
        return "yes" if matches else "no"
    assert len(matches) == 1
    return "left" if matches[0].cell in (0, 2) else "right"


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_every_answer_follows_from_the_scene(seed):
    for s in scenes.split(seed, 24):
        assert s.answer == _expected_answer(s)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert len({(o.colour, o.shape) for o in s.objects}) == len(s.objects)
        assert len({o.cell for o in s.objects}) == len(s.objects)


def test_objects_are_drawn_where_the_scene_says():
    for s in scenes.split(7, 60):
        for cell in range(4):
            row, col = divmod(cell, 2)
            patch = s.image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32].astype(int)
            bright = (patch.max(axis=2) > 150).sum()  # object colours have a channel above 190 - 25
            occupied = any(o.cell == cell for o in s.objects)
            assert (bright > 40) == occupied or s.task == "character"


def test_a_seed_is_a_split():
    a, b = scenes.split(3, 12), scenes.split(3, 12)
    assert all(np.array_equal(x.image, y.image) and x.question == y.question for x, y in zip(a, b))
    c = scenes.split(4, 12)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_balanced_split_has_every_task_equally():
    tasks = [s.task for s in scenes.split(1, 60, balanced=True)]
    assert all(tasks.count(t) == 10 for t in scenes.TASKS)


def test_glyphs_are_distinct_5x7_bitmaps():
    shapes = {g.shape for g in scenes.GLYPHS.values()}
    assert shapes == {(7, 5)}
    assert len({g.tobytes() for g in scenes.GLYPHS.values()}) == len(scenes.GLYPHS)


def test_normalise():
    assert scenes.normalise("  Red.\n") == "red"
    assert scenes.normalise("K") == "k"
