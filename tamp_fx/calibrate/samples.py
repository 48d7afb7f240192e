"""Calibration data: windows of a text file, or LLaVA / ShareGPT4V conversations (JSON or
JSONL, with ``image`` / ``images`` / ``audio`` / ``video`` paths resolved relative to the file;
``video`` is a video file or a list of its frame images, see :mod:`tamp_fx.calibrate.video`), turned
by the model's processor into model inputs (one sample = a batch of one).

Files are read strictly and in bounded pieces: the format comes from the extension, in any case
(``.json``, ``.jsonl``, anything else is text), the bytes must be UTF-8 text (a one-line error names
the offset of the first byte that is not), a JSONL file is read a line at a time and a text file
above :data:`STREAM_ABOVE` bytes is never tokenised whole (:func:`_streamed_windows`)."""
from __future__ import annotations

import codecs
import json
import logging
import random
import re
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from tamp_fx.calibrate import files
from tamp_fx.calibrate.files import checked_file, lines, newlines, open_bytes, pieces
from tamp_fx.calibrate.video import load_video, video_problem
from tamp_fx.errors import TampError, first_line
from tamp_fx.load.processors import takes_images

log = logging.getLogger(__name__)

STREAM_ABOVE = 16 << 20      # a text file above this many bytes is windowed without tokenising it whole

Sample = dict[str, torch.Tensor]
_PLACEHOLDER = re.compile(r"(<image>|<video>|<audio>)")
_MEDIA_KEYS = ("image", "images", "video", "videos", "audio", "audios")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}




def load_calibration(path: str | Path, processor: Any, *, nsamples: int = 128, seqlen: int = 512,
                     seed: int = 0, shard: tuple[int, int] = (0, 1)) -> list[Sample]:
    """Model inputs for up to ``nsamples`` calibration samples drawn with ``seed``.

    A ``.json`` / ``.jsonl`` file (any case) holds conversations; any other file is plain text,
    cut into windows of ``seqlen`` tokens at random offsets. ``shard=(r, K)``: of the list drawn,
    only the samples i with i % K == r (and only those are processed).
    """
    path = checked_file(path)
    if _kind(path) != "text":
        return _conversation_samples(path, processor, nsamples, seed, shard)
    return _text_windows(path, processor, nsamples, seqlen, seed, shard)


def calibration_inputs(path: str | Path) -> tuple[Path, ...]:
    """The calibration file and every media file its conversations name (resolved, whether or
    not they exist): the paths an output must never replace. The file's structure is checked
    on the way, so a malformed file is refused here, before any work."""
    path = checked_file(path)
    if _kind(path) == "text":
        return (path.resolve(),)
    media = {p for i, record in _records(path) for key in _MEDIA_KEYS for p in _media(record, key, path, i)}
    return (path.resolve(), *sorted(media))


def _kind(path: Path) -> str:
    """The format by the extension, in any case: "json", "jsonl" or "text"."""
    suffix = path.suffix.lower()
    return suffix[1:] if suffix in (".json", ".jsonl") else "text"


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _token_ids(processor: Any, text: str) -> list[int]:
    return _tokenizer(processor)(text, add_special_tokens=False)["input_ids"]


def _window(ids: torch.Tensor) -> Sample:
    return {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long)}


def _check_text(path: Path, head: str, blank: bool) -> None:
    """Refuse a text file without text, or one whose text is conversations (a .json/.jsonl by another name)."""
    if blank:
        raise TampError(f"calibration file {path} has no text: pass a file with text or conversations")
    start = head[:1 << 16].lstrip()
    if start[:1] in ("{", "[") and '"conversations"' in start:
        raise TampError(f"calibration file {path} holds JSON conversations but its extension ({path.suffix or 'none'}) "
                        "makes it plain text: name it .json or .jsonl")


def _text_windows(path: Path, processor: Any, nsamples: int, seqlen: int, seed: int,
                  shard: tuple[int, int]) -> list[Sample]:
    """``nsamples`` windows of ``seqlen`` tokens starting at token offsets drawn uniformly with
    ``seed`` from the whole file tokenised; above :data:`STREAM_ABOVE` bytes, :func:`_streamed_windows`."""
    size = path.stat().st_size
    if size > STREAM_ABOVE:
        return _streamed_windows(path, processor, nsamples, seqlen, seed, shard, size)
    text = "".join(pieces(path))
    _check_text(path, text, not text.strip())
    ids = torch.tensor(_token_ids(processor, text))  # (T,)
    if ids.numel() <= seqlen:
        raise TampError(f"calibration file {path} has {ids.numel()} tokens, not more than --seqlen {seqlen}: "
                        "pass a longer file or a smaller --seqlen")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(nsamples)][shard[0]::shard[1]]
    return [_window(ids[s:s + seqlen]) for s in starts]


def _streamed_windows(path: Path, processor: Any, nsamples: int, seqlen: int, seed: int,
                      shard: tuple[int, int], size: int) -> list[Sample]:
    """The windows of a text file above :data:`STREAM_ABOVE` bytes, in memory that does not grow
    with it. The file is checked a piece at a time (UTF-8 text, not blank); window i then starts
    at the i-th of ``nsamples`` byte offsets drawn uniformly with ``seed``: the bytes read there
    (16 a token, more if short) are cut at whitespace at both ends, so no character or word is
    cut, and their first ``seqlen`` tokens are the window (where fewer follow the offset, the
    last ``seqlen`` of the file). Only what the windows need is tokenised."""
    head, blank = "", True
    for piece in pieces(path):
        head, blank = head or piece, blank and piece.isspace()
    _check_text(path, head, blank)
    log.info("%s is %d MiB: its %d windows are read at random byte offsets, not drawn from the whole file "
             "tokenised (as they are up to %d MiB)", path.name, size >> 20, nsamples, STREAM_ABOVE >> 20)
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size) for _ in range(nsamples)][shard[0]::shard[1]]
    with open_bytes(path) as f:
        return [_window(torch.tensor(_tokens_at(f, path, offset, size, processor, seqlen))) for offset in offsets]


def _tokens_at(f: IO[bytes], path: Path, offset: int, size: int, processor: Any, seqlen: int) -> list[int]:
    """``seqlen`` token ids of the file from byte ``offset`` (:func:`_streamed_windows`)."""
    span, tail = 16 * seqlen, False
    while span <= max(files.PIECE, 256 * seqlen):
        start = max(0, size - span) if tail else offset
        f.seek(start)
        raw = f.read(span)
        ends = start + len(raw) >= size
        ids = _token_ids(processor, _whole_words(raw, start > 0, not ends))
        if len(ids) >= seqlen:
            return ids[-seqlen:] if tail else ids[:seqlen]
        tail, span = tail or ends, 2 * span
    raise TampError(f"calibration file {path} has fewer than {seqlen} tokens in {span // 2} bytes from byte {offset}: "
                    "pass a text file or a smaller --seqlen")


def _whole_words(raw: bytes, cut_start: bool, cut_end: bool) -> str:
    """The text of bytes read inside a UTF-8 file: from its first whitespace (``cut_start``) to
    before its last (``cut_end``), so no character or word cut in two is kept."""
    skip = next((i for i, byte in enumerate(raw[:4]) if byte & 0xC0 != 0x80), 0) if cut_start else 0
    text = newlines(codecs.getincrementaldecoder("utf-8")().decode(raw[skip:]))   # drops a character cut at the end
    if cut_start and (first := re.search(r"\s", text)):
        text = text[first.start():]
    if cut_end and (last := re.search(r"\s\S*\Z", text)):
        text = text[:last.start()]
    return text


def _parsed(text: str, path: Path, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:                    # a JSONDecodeError, or a number too long to convert
        extra = what == "JSON" and getattr(error, "msg", "") == "Extra data"
        hint = " (one conversation a line? name it .jsonl)" if extra else ""
        raise TampError(f"calibration file {path} is not valid {what}: {first_line(error)}{hint}") from error
    except RecursionError as error:
        raise TampError(f"calibration file {path} nests JSON too deeply to read: is it a calibration file?") from error


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The checked conversations of a .json / .jsonl file and their indices; a JSONL file is
    read a line at a time, a JSON file whole."""
    if _kind(path) == "jsonl":
        records: Any = (_parsed(line, path, f"JSONL: line {number}") for number, line in lines(path) if line.strip())
    else:
        records = _parsed("".join(pieces(path)), path, "JSON")
        records = records if isinstance(records, list) else []
    index = -1
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or not record["conversations"]:
            raise TampError(f"calibration sample {index} of {path} has no \"conversations\" list of turns")
        for turn in record["conversations"]:
            if not isinstance(turn, dict) or not isinstance(turn.get("value", turn.get("content", "")), str):
                raise TampError(f"calibration sample {index} of {path}: each turn of \"conversations\" must be an object "
                                'with a text "value", such as {"from": "human", "value": "<image>\\nWhat is this?"}')
        yield index, record
    if index < 0:
        raise TampError(f"calibration file {path} holds no conversations: expected a list of "
                        '{"image": ..., "conversations": [{"from": "human", "value": ...}, ...]}')


def _media(record: dict[str, Any], key: str, source: Path, index: int) -> list[Path]:
    """The resolved paths under ``key`` of a record: one path or a list of paths."""
    value = record.get(key)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise TampError(f"calibration sample {index} of {source}: \"{key}\" must be a file path or a list of file paths, "
                        f"not {json.dumps(value)[:60]}")
    try:
        return [(source.parent / item).resolve() for item in items]
    except (OSError, RuntimeError) as error:       # RuntimeError: a symbolic link loop (Python < 3.13)
        raise TampError(f"calibration sample {index} of {source}: \"{key}\" names a path that cannot be resolved "
                        f"({first_line(error)}): fix the path") from error


def _paths(record: dict[str, Any], keys: tuple[str, ...], base: Path, index: int, source: Path) -> list[Path]:
    found = [p for key in keys for p in _media(record, key, source, index)]
    for p in found:
        if not p.is_file():
            raise TampError(f"calibration sample {index} of {source} refers to missing file {p}: "
                            "fix the path (paths are relative to the calibration file)")
    return found


def _load_image(path: Path) -> Any:
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoder error, DecompressionBombError included
        raise TampError(f"calibration image {path} cannot be read ({first_line(error)}): pass a PNG or JPEG") from error


_PCM_TYPES = {1: np.uint8, 2: np.int16, 3: np.int32, 4: np.int32}   # 24-bit samples are widened to 32


def load_audio(path: Path, sampling_rate: int) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate, declared = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            frames = w.readframes(declared)
    except Exception as error:  # noqa: BLE001 - wave.Error, EOFError, struct.error from a damaged header
        raise TampError(f"calibration audio {path} cannot be read ({first_line(error)}): pass a PCM .wav file") from error
    if width not in _PCM_TYPES or channels < 1 or rate < 1000:
        raise TampError(f"calibration audio {path} is {8 * width}-bit, {channels} channels at {rate} Hz: "
                        "pass 8, 16, 24 or 32-bit PCM .wav audio")
    if declared == 0 or len(frames) < declared * width * channels:
        raise TampError(f"calibration audio {path} is truncated or empty: its header promises {declared} frames, "
                        f"it holds {len(frames) // (width * channels)}: re-export the file")
    raw = np.frombuffer(frames, dtype=np.uint8)  # (frames * channels * width,), little-endian samples
    if width == 3:                               # 24-bit: each sample in the top three bytes of an int32
        wide = np.zeros((raw.size // 3, 4), dtype=np.uint8)
        wide[:, 1:] = raw.reshape(-1, 3)
        raw = wide.reshape(-1)
    dtype = _PCM_TYPES[width]
    audio = raw.view(np.dtype(dtype).newbyteorder("<")).astype(np.float32).reshape(-1, channels).mean(1)  # (T,)
    audio = (audio - 128) / 128 if width == 1 else audio / float(np.iinfo(dtype).max)
    if rate != sampling_rate:  # linear resampling is enough for calibration statistics
        n = int(round(len(audio) * sampling_rate / rate))
        audio = np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio).astype(np.float32)
    return audio


def _messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    messages = []
    for turn in record["conversations"]:
        role = _ROLES.get(str(turn.get("from", turn.get("role", "human"))).lower(), "user")
        content = []
        for part in _PLACEHOLDER.split(str(turn.get("value", turn.get("content", "")))):
            if part in ("<image>", "<video>", "<audio>"):
                content.append({"type": part[1:-1]})
            elif part.strip():
                content.append({"type": "text", "text": part.strip()})
        messages.append({"role": role, "content": content})
    return messages


def _prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, tokenize=False)
    tokens = {"image": getattr(processor, "image_token", "<image>"), "video": getattr(processor, "video_token", "<video>"),
              "audio": getattr(processor, "audio_token", "<audio>")}
    lines = []
    for m in messages:
        body = " ".join(c["text"] if c["type"] == "text" else tokens[c["type"]] for c in m["content"])
        lines.append(f"{m['role'].upper()}: {body}")
    return "\n".join(lines)


def _conversation_samples(path: Path, processor: Any, nsamples: int, seed: int, shard: tuple[int, int]) -> list[Sample]:
    """Conversations drawn with ``seed``: the records are counted in a first pass and only those
    drawn are kept from a second."""
    total = sum(1 for _ in _records(path))
    order = list(range(total))
    random.Random(seed).shuffle(order)
    drawn = order[:nsamples][shard[0]::shard[1]]
    wanted = set(drawn)
    records = {index: record for index, record in _records(path) if index in wanted}
    samples = []
    for index in drawn:
        record = records[index]
        images = [_load_image(p) for p in _paths(record, ("image", "images"), path.parent, index, path)]
        audio_paths = _paths(record, ("audio", "audios"), path.parent, index, path)
        kwargs: dict[str, Any] = {}
        if images:
            if not takes_images(processor):
                raise TampError(f"calibration sample {index} of {path} has images but the model takes no images")
            kwargs["images"] = images
        if audio_paths:
            extractor = getattr(processor, "feature_extractor", None)
            if extractor is None:
                raise TampError(f"calibration sample {index} of {path} has audio but the model takes no audio")
            kwargs["audio"] = [load_audio(p, extractor.sampling_rate) for p in audio_paths]
            kwargs["sampling_rate"] = extractor.sampling_rate
        video_paths = _paths(record, ("video",), path.parent, index, path)   # a video file, or its frames
        if video_paths:
            problem = video_problem(processor)
            if problem:
                raise TampError(f"calibration sample {index} of {path} has a video, but {problem}")
            kwargs["videos"] = [load_video(video_paths, _load_image)]
        call = processor if kwargs else _tokenizer(processor)
        try:
            inputs = call(text=[_prompt(processor, _messages(record))], return_tensors="pt", **kwargs)
        except Exception as error:  # noqa: BLE001
            raise TampError(f"the processor rejected calibration sample {index} of {path}: {first_line(error)}") from error
        samples.append(dict(inputs))
    if total < nsamples:
        log.warning("%s has %d conversations, fewer than nsamples=%d: using all of them", path.name, total, nsamples)
    return samples
