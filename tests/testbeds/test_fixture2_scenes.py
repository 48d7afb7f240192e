"""Fixture 2's scenes: every answer follows from the scene, splits are seeds, the held-out
split is never trained on, and answers are one word."""
from __future__ import annotations

import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.testbeds.fixture2 import scenes
from tamp_fx.testbeds.fixture2.train import batch_samples


def _find(objs, colour, shape):
    matches = [o for o in objs if (o.colour, o.shape) == (colour, shape)]
    assert len(matches) == 1, "a question names an object that appears exactly once"
    return matches[0]


def _expected_answer(s: scenes.Sample) -> str:
    """The answer recomputed from the scene's objects and text, independently of the generator."""
    q, objs = s.question, s.objects
    if s.task == "text":
        return s.text.string
    if s.task == "count":
        colour = q.split()[2]
        return str(sum(o.colour == colour for o in objs))
    if s.task == "colour":
        size, shape = q.removeprefix("What colour is the ").removesuffix("?").split()
        matches = [o for o in objs if (o.size, o.shape) == (size, shape)]
        assert len(matches) == 1
        return matches[0].colour
    if s.task == "cell":
        cell = scenes.CELL_NAMES.index(re.fullmatch(r"What is in cell (\w+)\?", q)[1])
        for o in objs:
            if o.cell == cell:
                return o.shape
        return "text" if s.text is not None and cell in s.text.cells else "nothing"
    if s.task == "quadrant":
        o = _find(objs, *q.removeprefix("Which quadrant is the ").removesuffix(" in?").split())
        return ("top" if o.cell // 4 < 2 else "bottom") + "-" + ("left" if o.cell % 4 < 2 else "right")
    m = re.fullmatch(r"Is the (\w+) (\w+) (above|below|to the left of|to the right of) the (\w+) (\w+)\?", q)
    a, b = _find(objs, m[1], m[2]), _find(objs, m[4], m[5])
    (ar, ac), (br, bc) = divmod(a.cell, 4), divmod(b.cell, 4)
    holds = {"above": ar < br, "below": ar > br, "to the left of": ac < bc, "to the right of": ac > bc}[m[3]]
    return "yes" if holds else "no"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_every_answer_follows_from_the_scene_and_is_one_word(seed):
    for s in scenes.split(seed, 24):
        assert s.answer == _expected_answer(s)
        assert re.fullmatch(r"\S+", s.answer) and s.answer == s.answer.strip()
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.objects) <= scenes.MAX_OBJECTS
        assert len({(o.colour, o.shape) for o in s.objects}) == len(s.objects)
        cells = [o.cell for o in s.objects] + list(s.text.cells if s.text else ())
        assert len(set(cells)) == len(cells), "one thing per cell"


def test_objects_and_text_are_drawn_where_the_scene_says():
    for s in scenes.split(7, 60):
        text_cells = set(s.text.cells) if s.text else set()
        for cell in range(16):
            row, col = divmod(cell, 4)
            patch = s.image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32].astype(int)
            bright = (patch.max(axis=2) > 150).sum()     # object and ink colours have a channel above 165
            assert (bright > 20) == (cell in text_cells or any(o.cell == cell for o in s.objects)), (cell, s.question)


def test_the_text_stays_in_one_tile_one_character_per_slot():
    for s in scenes.split(3, 120):
        if s.text is None:
            continue
        slots = s.text.slots()
        assert 2 <= len(slots) <= 4 and "".join(ch for _, _, ch in slots) == s.text.string
        assert len({r // 4 for r, _, _ in slots}) == 1 and len({c // 4 for _, c, _ in slots}) == 1  # one 64-px tile
        assert all(2 * s.text.col <= c < 2 * s.text.col + 4 for _, c, _ in slots)


def test_a_seed_is_a_split():
    a, b = scenes.split(3, 12), scenes.split(3, 12)
    assert all(np.array_equal(x.image, y.image) and x.question == y.question for x, y in zip(a, b))
    c = scenes.split(4, 12)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_held_out_is_1200_questions_200_per_task():
    held = scenes.held_out()
    assert len(held) == 1200
    assert all(sum(s.task == t for s in held) == 200 for t in scenes.TASKS)
    assert all(s.answer for s in held)


def test_training_never_draws_a_held_out_question():
    held = scenes.held_out()
    keys = {scenes.key(s) for s in held}
    # make the training stream start with held-out questions: they must be skipped
    planted = {scenes.key(s) for s in batch_samples(0, 1, 8, set())}
    drawn = batch_samples(0, 1, 8, planted)
    assert not planted & {scenes.key(s) for s in drawn}
    # and the real stream (many steps of both stages) shares no key with the held-out split
    stream = [s for stage in (0, 1) for step in range(1, 40) for s in batch_samples(stage, step, 8, keys)]
    assert not keys & {scenes.key(s) for s in stream}


def test_training_batches_are_a_function_of_stage_and_step():
    a, b = batch_samples(1, 5, 4, set()), batch_samples(1, 5, 4, set())
    assert [scenes.key(s) for s in a] == [scenes.key(s) for s in b]
    assert [scenes.key(s) for s in a] != [scenes.key(s) for s in batch_samples(1, 6, 4, set())]


def test_describing_words_cover_every_content_token():
    for s in scenes.split(5, 30):
        base, tiles = scenes.describing_words(s)
        assert len(base) == 16 and len(tiles) == 64
        if s.text is not None:
            assert "".join(bag[0] for bag in tiles if len(bag[0]) == 1) == s.text.string


def test_answers_are_balanced_enough_to_need_the_image():
    held = scenes.held_out()
    for task in scenes.TASKS:
        answers = [s.answer for s in held if s.task == task]
        top = max(answers.count(a) for a in set(answers))
        assert top / len(answers) < 0.6, (task, top)    # no answer is right most of the time


def test_every_tile_is_lit_towards_the_image_centre():
    """Anyres encodes each 64-px tile alone: the background must tell a tile where it lies.
    In every tile of every scene, the background of the quarter nearest the image's centre is
    brighter than that of the quarter farthest from it."""
    for s in scenes.split(9, 40):
        image = s.image.astype(float)                                  # (128, 128, 3)
        background = image.max(axis=2) < 130                           # objects and ink have a channel above 165
        for ty in range(2):
            for tx in range(2):
                def mean_of(qy, qx):                                    # a 32x32 quarter of the tile
                    y, x = 64 * ty + 32 * qy, 64 * tx + 32 * qx
                    keep = background[y:y + 32, x:x + 32]
                    return image[y:y + 32, x:x + 32][keep].mean()
                inner, outer = mean_of(1 - ty, 1 - tx), mean_of(ty, tx)
                assert inner > outer + 10, (ty, tx, inner, outer)


def test_every_token_says_all_of_its_cell_and_where_it_is():
    cells = scenes.token_cells()
    assert cells[:16] == list(range(16)) and len(cells) == 80 and all(cells.count(c) == 5 for c in range(16))
    for s in scenes.split(6, 30):
        base, tiles = scenes.describing_words(s)
        by_cell = {o.cell: o for o in s.objects}
        text_cells = set(s.text.cells) if s.text else set()
        for i, (bag, cell) in enumerate(zip(base + tiles, cells)):
            *what, number = bag
            assert number == scenes.CELL_WORDS[cell]
            if cell in by_cell:
                o = by_cell[cell]
                assert what == ([o.colour] if i < 16 else [o.colour, o.shape, o.size])
            elif cell in text_cells:
                assert what == ["text"] or (i >= 16 and len(what) == 1 and what[0] in scenes.CHARACTERS)
            else:
                assert what == ["nothing"]


def test_a_task_listed_twice_is_asked_twice_with_different_questions():
    from tamp_fx.testbeds.fixture2.train import batch_conversations
    tasks = scenes.TASKS + ("cell", "cell", "quadrant")
    convs = batch_conversations(1, 3, 24, len(tasks), set(), tasks)
    per_task = [sum(s.task == "cell" for s in c) for c in convs]
    assert max(per_task) == 3 and all(n >= 1 for n in per_task)   # every scene can pose a cell question
    for c in convs:
        assert len({s.question for s in c}) == len(c), "a conversation never repeats a question"
        assert len({s.image.tobytes() for s in c}) == 1


def test_an_unknown_task_is_refused_by_name():
    import pytest

    from tamp_fx.testbeds.fixture2 import train
    with pytest.raises(SystemExit):
        train.parse(["--tasks", "colour,cel", "--out", "x.safetensors"])
    assert train.parse(["--tasks", "cell, cell,quadrant"]).tasks == ("cell", "cell", "quadrant")


def test_steps_zero_is_the_alignment_only_but_not_with_ideal_tokens():
    import pytest

    from tamp_fx.testbeds.fixture2 import train
    assert train.parse(["--steps", "0"]).steps == 0
    for bad in (["--steps", "-1"], ["--steps", "0", "--ideal-tokens", "--out", "x.safetensors"]):
        with pytest.raises(SystemExit):
            train.parse(bad)
