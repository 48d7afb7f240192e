"""Procedural scenes and questions for fixture 2 (LLaVA-NeXT, anyres images).

Every sample is a 128x128 RGB image and one question whose answer is one word (no spaces).
A scene is a 4x4 grid of 32-px cells holding one to eight coloured shapes, small or large,
no two alike in both colour and shape, and, in half the scenes (every "text" scene), a short
string of two to four characters written in one or two neighbouring cells of one row (one
character per 16-px slot, a 5x7 font at scale 2: 10x14 px). The anyres processor sees the
image as a 64x64 base view (a cell is 16 px there, a small shape a few pixels, a character
unreadable) and four 64x64 tiles (a cell is 32 px, as in fixture 1); the text never crosses a
tile.

Six tasks, each needing the image:

* colour: the colour of a named small (or large) shape;
* cell: what is in a given cell, named by its number in reading order ("cell ten"): a
  shape, "text" or "nothing";
* count: how many objects of a colour;
* quadrant: which quadrant an object is in ("top-left" ...);
* text: the string the image shows;
* relation: whether one object is above / below / left of / right of another ("yes" / "no").

Everything is drawn from ``numpy.random.Generator(seed)``, so a split is a seed. The held-out
split (:data:`HELD_OUT_SEED`, 200 questions per task) is kept out of training exactly, not only
in expectation: :func:`key` identifies a sample by its scene and question, and training skips
any sample whose key is held out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tamp_fx.testbeds.fixture.scenes import CHARACTERS, COLOURS, GLYPHS, SHAPES, background, normalise, shape_mask, tint

__all__ = ["CHARACTERS", "COLOURS", "SHAPES", "TASKS", "Obj", "Text", "Sample", "sample", "split", "held_out",
           "key", "normalise"]

SIZE, GRID = 128, 4
CELL = SIZE // GRID          # 32 px
SLOT = 16                    # one character per 16-px slot: one vision-tower patch in a tile
SCALE = 2                    # glyphs at 10x14 px
RADII = {"small": (4.5, 6.5), "large": (9.0, 12.0)}
SIZES = tuple(RADII)
TASKS: tuple[str, ...] = ("colour", "cell", "count", "quadrant", "text", "relation")
QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
MAX_OBJECTS = 8
HELD_OUT_SEED = 101          # tamp-fx's held-out split for fixture 2 (1,200 questions)
HELD_OUT_N = 1200
LIGHT = 48                   # the background's brightening from corner to centre (levels of 255)
# A cell is named by one number word in reading order ("cell ten" is the third row's second
# cell), so that a question about a cell names it with one token, as the content questions name
# a shape, and each image token can say which cell it lies in with that very token. With
# perfect image tokens and cell questions only, SmolLM2 and its LoRA answered 83% of them after
# 50 steps with this one-word key, 31% with the earlier two-word one ("column b, row three";
# docs/fixture2-ideal-token-probes.jsonl, probes 7 and 9).
CELL_NAMES = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
              "thirteen", "fourteen", "fifteen", "sixteen")
CELL_WORDS = tuple(" " + n for n in CELL_NAMES)       # as the question's tokens spell them
ROW_NAMES = ("first", "second", "third", "fourth")     # for the descriptions


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str   # "small" or "large"
    cell: int   # 0..15 in reading order: row = cell // 4, column = cell % 4

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def quadrant(self) -> str:
        return QUADRANTS[2 * (self.row >= GRID // 2) + (self.col >= GRID // 2)]


@dataclass(frozen=True)
class Text:
    string: str
    row: int        # cell row 0..3
    col: int        # column 0 or 2: the text lies in this cell and the next (so it stays in one tile)
    line: int       # which half of the cell row (0 upper, 1 lower): the 16-px slot row
    start: int      # first 16-px slot of the four across the two cells

    @property
    def cells(self) -> tuple[int, ...]:
        """The one or two cells the characters are in (a cell holds two slots)."""
        return tuple(sorted({self.row * GRID + scol // 2 for _, scol, _ in self.slots()}))

    def slots(self) -> list[tuple[int, int, str]]:
        """(slot row, slot column, character) in the image's 8x8 grid of 16-px slots."""
        return [(2 * self.row + self.line, 2 * self.col + self.start + i, ch) for i, ch in enumerate(self.string)]


@dataclass(frozen=True)
class Sample:
    image: np.ndarray              # (128, 128, 3) uint8
    question: str
    answer: str
    task: str
    objects: tuple[Obj, ...]
    text: Text | None = None


def key(s: Sample) -> tuple:
    """What makes a sample the same question: its scene's layout and the question (not the
    noise, jitter or tints, which are drawn afresh)."""
    return (tuple(sorted((o.cell, o.colour, o.shape, o.size) for o in s.objects)), s.text, s.question)


# ----------------------------------------------------------------------------- drawing

def _lit_from_the_middle() -> np.ndarray:
    """(SIZE, SIZE, 1): the light falling on the background, :data:`LIGHT` levels brighter at
    the image's centre than at its corners. Anyres encodes every tile alone, so this is how a
    tile token can tell where its tile lies: the background brightens towards the image's centre."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5 - SIZE / 2                        # pixel centres from the middle
    return np.rint(LIGHT * (1 - np.hypot(x, y) / np.hypot(SIZE / 2, SIZE / 2)))[..., None].astype(np.int16)


_LIGHT = _lit_from_the_middle()


def _draw(rng: np.random.Generator, objects: list[Obj], text: Text | None) -> np.ndarray:
    image = background(rng, SIZE) + _LIGHT                                  # (128, 128, 3): at most 116
    for obj in objects:
        r = rng.uniform(*RADII[obj.size])
        cx = obj.col * CELL + rng.uniform(r + 1, CELL - r - 1)
        cy = obj.row * CELL + rng.uniform(r + 1, CELL - r - 1)
        image[shape_mask(obj.shape, cx, cy, r, SIZE)] = tint(rng, obj.colour)
    if text is not None:
        ink = np.clip(235 + rng.integers(-20, 21, size=3), 0, 255)  # (3,) near-white, unlike every colour
        for srow, scol, ch in text.slots():
            glyph = np.kron(GLYPHS[ch], np.ones((SCALE, SCALE), dtype=bool))  # (14, 10)
            top = srow * SLOT + int(rng.integers(0, SLOT - glyph.shape[0] + 1))
            left = scol * SLOT + int(rng.integers(2, SLOT - glyph.shape[1] - 1))
            image[top:top + glyph.shape[0], left:left + glyph.shape[1]][glyph] = ink
    return image.astype(np.uint8)


def _scene(rng: np.random.Generator, with_text: bool) -> tuple[list[Obj], Text | None]:
    free = list(range(GRID * GRID))
    text = None
    if with_text:
        length = int(rng.integers(2, 5))
        row, col = int(rng.integers(GRID)), 2 * int(rng.integers(2))
        string = "".join(CHARACTERS[int(i)] for i in rng.integers(len(CHARACTERS), size=length))
        text = Text(string, row, col, int(rng.integers(2)), int(rng.integers(0, 4 - length + 1)))
        free = [c for c in free if c not in text.cells]
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.permutation(free)[:count]
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    picks = rng.permutation(len(kinds))[:count]
    sizes = rng.integers(len(SIZES), size=count)
    return [Obj(kinds[p][0], kinds[p][1], SIZES[z], int(cell)) for p, cell, z in zip(picks, cells, sizes)], text


# ----------------------------------------------------------------------------- questions

def cell_name(cell: int) -> str:
    """"cell ten" for cell 9 (row = cell // 4 = 2, column = cell % 4 = 1; numbered from one)."""
    return f"cell {CELL_NAMES[cell]}"


def _name(o: Obj) -> str:
    return f"{o.colour} {o.shape}"


def _colour(rng, objects, text):
    counts = {}
    for o in objects:
        counts[(o.size, o.shape)] = counts.get((o.size, o.shape), 0) + 1
    unique = [o for o in objects if counts[(o.size, o.shape)] == 1]
    small = [o for o in unique if o.size == "small"]
    pool = small or unique                      # a small shape when there is one: the tiles matter
    if not pool:
        return None
    o = pool[int(rng.integers(len(pool)))]
    return f"What colour is the {o.size} {o.shape}?", o.colour


def _cell(rng, objects, text):
    by_cell = {o.cell: o.shape for o in objects}
    if text is not None:
        by_cell |= dict.fromkeys(text.cells, "text")
    empty = [c for c in range(GRID * GRID) if c not in by_cell]
    kinds = [k for k, ok in (("object", bool(objects)), ("empty", bool(empty)), ("text", text is not None)) if ok]
    weights = np.array([{"object": 0.6, "empty": 0.25, "text": 0.15}[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind == "object":
        cell = objects[int(rng.integers(len(objects)))].cell
    elif kind == "text":
        cell = text.cells[int(rng.integers(len(text.cells)))]
    else:
        cell = empty[int(rng.integers(len(empty)))]
    return f"What is in {cell_name(cell)}?", by_cell.get(cell, "nothing")


def _count(rng, objects, text):
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return f"How many {colour} objects are there?", str(sum(o.colour == colour for o in objects))


def _quadrant(rng, objects, text):
    o = objects[int(rng.integers(len(objects)))]
    return f"Which quadrant is the {_name(o)} in?", o.quadrant


def _text(rng, objects, text):
    return ("What does the text say?", text.string) if text is not None else None


_RELATIONS = {"above": lambda a, b: a.row < b.row, "below": lambda a, b: a.row > b.row,
              "to the left of": lambda a, b: a.col < b.col, "to the right of": lambda a, b: a.col > b.col}


def _relation(rng, objects, text):
    if len(objects) < 2:
        return None
    i, j = rng.permutation(len(objects))[:2]
    a, b = objects[int(i)], objects[int(j)]
    usable = ([r for r in ("above", "below") if a.row != b.row] + [r for r in ("to the left of", "to the right of") if a.col != b.col])
    if not usable:
        return None
    relation = usable[int(rng.integers(len(usable)))]
    return f"Is the {_name(a)} {relation} the {_name(b)}?", "yes" if _RELATIONS[relation](a, b) else "no"


_QUESTIONS = {"colour": _colour, "cell": _cell, "count": _count, "quadrant": _quadrant, "text": _text,
              "relation": _relation}
assert tuple(_QUESTIONS) == TASKS


def ask(rng: np.random.Generator, task: str, objects, text: Text | None) -> tuple[str, str] | None:
    """(question, answer) of ``task`` about a scene, or None if the scene cannot pose it."""
    return _QUESTIONS[task](rng, list(objects), text)


def conversation(rng: np.random.Generator, turns: int, text_share: float = 0.5,
                 tasks: tuple[str, ...] = TASKS) -> list[Sample]:
    """Up to ``turns`` questions about one scene (the same image), one per entry of ``tasks``
    in random order (a task listed twice is asked twice, a different question each time); a
    scene that cannot pose a question skips it. ``text_share`` of the scenes show text."""
    objects, text = _scene(rng, with_text=rng.random() < text_share)
    image = _draw(rng, objects, text)
    out, asked = [], set()
    for task in rng.permutation(tasks):
        if len(out) == turns:
            break
        qa = ask(rng, str(task), objects, text)
        if qa is not None and qa[0] not in asked:
            asked.add(qa[0])
            out.append(Sample(image, qa[0], qa[1], str(task), tuple(objects), text))
    return out


def sample(rng: np.random.Generator, task: str | None = None) -> Sample:
    """One sample; ``task`` None draws it uniformly from :data:`TASKS`."""
    task = task or TASKS[int(rng.integers(len(TASKS)))]
    while True:
        objects, text = _scene(rng, with_text=task == "text" or rng.random() < 0.5)
        qa = ask(rng, task, objects, text)
        if qa is not None:
            break
    return Sample(_draw(rng, objects, text), qa[0], qa[1], task, tuple(objects), text)


def split(seed: int, n: int, *, balanced: bool = False) -> list[Sample]:
    """``n`` samples from ``seed``; ``balanced`` cycles through the tasks (n/6 of each)."""
    rng = np.random.default_rng(seed)
    return [sample(rng, TASKS[i % len(TASKS)] if balanced else None) for i in range(n)]


def held_out(n: int = HELD_OUT_N) -> list[Sample]:
    """The held-out split: ``n`` questions from :data:`HELD_OUT_SEED`, the tasks in equal numbers."""
    return split(HELD_OUT_SEED, n, balanced=True)


def describing_words(s: Sample) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The words each image token is aligned to: what its cell holds and where the cell is.

    Every token says all of its cell (a bag of words, summed embeddings), so that a question
    about one object or cell is one lookup and a copy: "the small triangle" finds the tokens
    saying "small" and "triangle" and reads their colour; "cell ten" finds those saying " ten"
    and reads the shape (or "text", or "nothing"). A quadrant or a relation is read off a
    cell's number (tokens that also said their halves, "top" and "left", were looked up
    worse: probes 10 and 11 in docs/fixture2-ideal-token-probes.jsonl). Base view (4x4 tokens,
    one per cell; small shapes are a few pixels there, characters unreadable): the object's
    colour, or "text", or "nothing". Tiles (8x8 tokens, reading order over the whole image,
    2x2 per cell): an object's colour, shape and size; a text cell's character in its slot (or
    "text" in an empty slot); "nothing". Then where: the cell's number word (:data:`CELL_WORDS`)."""
    by_cell = {o.cell: o for o in s.objects}
    text_cells = set(s.text.cells) if s.text is not None else set()
    chars = {(r, c): ch for r, c, ch in s.text.slots()} if s.text is not None else {}

    base = [((by_cell[c].colour,) if c in by_cell else ("text",) if c in text_cells else ("nothing",)) + (CELL_WORDS[c],)
            for c in range(GRID * GRID)]
    tiles = []
    for slot, cell in enumerate(token_cells()[GRID * GRID:]):      # slot = srow * 8 + scol
        o = by_cell.get(cell)
        if o is not None:
            what = (o.colour, o.shape, o.size)
        elif cell in text_cells:
            what = (chars.get(divmod(slot, 2 * GRID), "text"),)
        else:
            what = ("nothing",)
        tiles.append(what + (CELL_WORDS[cell],))
    return base, tiles


def token_cells() -> list[int]:
    """The cell (0..15) each of the 80 content tokens lies in, in :func:`describing_words`'
    order: the base view's 16 (one per cell), then the tiles' 64 (reading order over the image)."""
    return list(range(GRID * GRID)) + [(srow // 2) * GRID + scol // 2 for srow in range(2 * GRID) for scol in range(2 * GRID)]
