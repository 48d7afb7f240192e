"""Calibration readers: the format by extension in any case and confirmed by content, strict
UTF-8 with the offset of the first bad byte, binary and non-regular files refused in one line,
text windows as before for normal files and in bounded memory for huge ones."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.cli import fails_cleanly
from tamp_fx.calibrate import files, samples
from tamp_fx.calibrate.samples import calibration_inputs, load_calibration
from tamp_fx.errors import TampError
from tamp_fx.load.source import load_processor, resolve_source
from tamp_fx.testbeds.demo import CALIB_TEXT


@pytest.fixture(scope="module")
def llama(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="module")
def tokenizer(llama):
    return load_processor(resolve_source(llama))


def _ids(found: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    return [sample["input_ids"][0].tolist() for sample in found]


def _reference_windows(path: Path, tokenizer, nsamples: int, seqlen: int, seed: int,
                       shard: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """The text reader before streaming, as it was: the file read whole (invalid bytes replaced),
    tokenised whole, and window starts drawn among its tokens."""
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(nsamples)][shard[0]::shard[1]]
    return [ids[s:s + seqlen].tolist() for s in starts]


# --- the same windows as before for normal files -------------------------------------------

def _variants(tmp_path: Path) -> dict[str, Path]:
    text = CALIB_TEXT.read_text(encoding="utf-8")
    files = {"wikitext": CALIB_TEXT, "upper-case .TXT": tmp_path / "CALIB.TXT",
             "CRLF, BOM, non-ASCII, no extension": tmp_path / "calib"}
    files["upper-case .TXT"].write_text(text, encoding="utf-8")
    files["CRLF, BOM, non-ASCII, no extension"].write_bytes(
        ("\ufeff" + text.replace("\n", "\r\n").replace(" the ", " thé ") + "\rlast\r").encode())
    return files


@pytest.mark.parametrize("seed, nsamples, seqlen, shard", [(0, 16, 64, (0, 1)), (3, 9, 200, (1, 3))])
def test_normal_text_files_give_the_windows_they_gave_before(tmp_path, tokenizer, seed, nsamples, seqlen, shard):
    for name, path in _variants(tmp_path).items():
        found = load_calibration(path, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, shard=shard)
        assert _ids(found) == _reference_windows(path, tokenizer, nsamples, seqlen, seed, shard), name
        assert all(s["attention_mask"].shape == (1, seqlen) and s["attention_mask"].all() for s in found)


def test_pieces_join_to_what_read_text_gives(tmp_path, monkeypatch):
    """Pieces cut inside multi-byte characters and between "\\r" and "\\n" join up exactly."""
    path = tmp_path / "t.txt"
    path.write_bytes("a\r\nb\rc\n\u00e9\u20ac\U0001f600 d\r\r\n".encode() * 50)
    for piece in (1, 2, 3, 5, 64):
        monkeypatch.setattr(files, "PIECE", piece)
        assert "".join(files.pieces(path)) == path.read_text(encoding="utf-8")


# --- format by extension, any case, confirmed by content -------------------------------------

@pytest.mark.parametrize("name", ["CALIB.JSONL", "Calib.Jsonl", "calib.JSON"])
def test_upper_case_extensions_are_read_as_their_format(tmp_path, llama, tokenizer, name):
    lines = (llama / "calib.jsonl").read_text().splitlines()
    path = tmp_path / name
    path.write_text(json.dumps([json.loads(line) for line in lines]) if name.lower().endswith(".json")
                    else "\n".join(lines) + "\n")
    expected = _ids(load_calibration(llama / "calib.jsonl", tokenizer, nsamples=3, seed=1))
    assert _ids(load_calibration(path, tokenizer, nsamples=3, seed=1)) == expected
    assert calibration_inputs(path) == (path.resolve(),)


def test_conversations_in_a_file_read_as_text_are_refused(tmp_path, llama, tokenizer):
    path = tmp_path / "calib.jsonl.txt"
    shutil.copy(llama / "calib.jsonl", path)
    with pytest.raises(TampError, match=r"holds JSON conversations .*\(\.txt\).*name it \.json or \.jsonl"):
        load_calibration(path, tokenizer, nsamples=2)


@pytest.mark.parametrize("name, contents, expected", [
    ("c.jsonl", "this is plain text\n", r"not valid JSONL: line 1: "),
    ("c.jsonl", '{"conversations": [{"from": "human", "value": "hi"}]}\n\n{"conversations": [\n',
     r"not valid JSONL: line 3: "),
    ("c.json", "plain text", r"not valid JSON: "),
    ("c.json", '{"conversations": [{"value": "a"}]}\n{"conversations": [{"value": "b"}]}\n', r"name it \.jsonl"),
])
def test_damaged_json_names_the_line(tmp_path, tokenizer, name, contents, expected):
    path = tmp_path / name
    path.write_text(contents)
    for step in (lambda: calibration_inputs(path), lambda: load_calibration(path, tokenizer, nsamples=2)):
        with pytest.raises(TampError, match=expected):
            step()


def test_a_jsonl_line_too_long_for_a_conversation_is_refused_by_number(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_LINE", 1000)
    monkeypatch.setattr(files, "PIECE", 256)
    path = tmp_path / "c.jsonl"
    record = json.dumps({"conversations": [{"from": "human", "value": "hi"}]})
    path.write_text(record + "\n" + json.dumps({"conversations": [{"from": "human", "value": "x" * 5000}]}) + "\n")
    with pytest.raises(TampError, match=r"line 2 is over .* too long for one conversation"):
        calibration_inputs(path)


# --- strict UTF-8, binary refused ------------------------------------------------------------

def _offset(message: str, pattern: str) -> int:
    match = re.search(pattern, message)
    assert match, message
    return int(match[1])


@pytest.mark.parametrize("name", ["calib.txt", "calib.jsonl", "calib.json", "model.safetensors"])
def test_random_bytes_are_refused_as_binary_with_an_offset(tmp_path, tokenizer, name):
    data = random.Random(0).randbytes(1 << 16)
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(TampError, match="pass a UTF-8 text, .json or .jsonl file") as error:
        load_calibration(path, tokenizer, nsamples=2, seqlen=8)
    at = _offset(str(error.value), r"looks binary \(byte (\d+)\)")
    assert at < 64 and "\0" not in data[:at].decode("utf-8")   # the bytes before it are text


def test_a_safetensors_file_is_refused_as_binary_at_its_first_nul(tmp_path, tokenizer):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    assert len(header) < 128                       # so byte 0 is ASCII and byte 1 the first NUL
    with pytest.raises(TampError, match=r"looks binary \(byte 1\)"):
        load_calibration(path, tokenizer, nsamples=2, seqlen=8)


@pytest.mark.parametrize("name", ["calib.txt", "calib.jsonl"])
@pytest.mark.parametrize("piece", [7, 4096, None])
def test_invalid_utf8_in_the_middle_is_refused_at_its_offset(tmp_path, tokenizer, monkeypatch, name, piece):
    if piece:
        monkeypatch.setattr(files, "PIECE", piece)
    line = json.dumps({"conversations": [{"from": "human", "value": "caf\u00e9 \u20ac"}]}) + "\n"
    good = (line * 2000).encode()                  # multi-byte characters across every piece border
    path = tmp_path / name
    path.write_bytes(good + b"\xff" + good)
    with pytest.raises(TampError, match=rf"not UTF-8 text \(invalid byte at offset {len(good)}\): save it as UTF-8"):
        load_calibration(path, tokenizer, nsamples=2, seqlen=8)


@pytest.mark.parametrize("data, pattern, offset", [
    (b"caf\xe9 au lait, latin-1 text " * 10, r"not UTF-8 text \(invalid byte at offset (\d+)\)", 3),
    (b"text " * 20_000 + b"\0" + b"more", r"looks binary \(byte (\d+)\)", 100_000),
    (b"text that ends in half a character \xe2\x82", r"not UTF-8 text \(invalid byte at offset (\d+)\)", 35),
    (b"a bell \x07 early on", r"looks binary \(byte (\d+)\)", 7),
])
def test_the_first_byte_that_is_not_text_is_named(tmp_path, tokenizer, data, pattern, offset):
    path = tmp_path / "calib.txt"
    path.write_bytes(data)
    with pytest.raises(TampError) as error:
        load_calibration(path, tokenizer, nsamples=2, seqlen=8)
    assert _offset(str(error.value), pattern) == offset


# --- not a regular file ----------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_called_a_fifo(tmp_path, llama, tokenizer):
    fifo = tmp_path / "fifo" / "calib.txt"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    for step in (lambda: calibration_inputs(fifo), lambda: load_calibration(fifo, tokenizer)):
        with pytest.raises(TampError, match="is a FIFO, not a regular file"):
            step()                                 # and returns: the FIFO is never opened
    fails_cleanly(["plan", llama, "--calib", fifo, "--out", tmp_path / "p", "-q"], "is a FIFO, not a regular file",
                  tmp_path / "p")


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_device_is_called_a_device(tokenizer):
    with pytest.raises(TampError, match="is a character device, not a regular file"):
        load_calibration("/dev/null", tokenizer)


# --- streamed windows --------------------------------------------------------------------------

def test_streamed_windows_are_text_of_the_file_drawn_across_it(tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(samples, "STREAM_ABOVE", 4096)
    text = CALIB_TEXT.read_text(encoding="utf-8")
    with caplog.at_level("INFO", logger=samples.__name__):
        found = load_calibration(CALIB_TEXT, tokenizer, nsamples=32, seqlen=48, seed=5)
    assert "random byte offsets" in caplog.text and CALIB_TEXT.name in caplog.text
    decoded = [tokenizer.decode(ids, clean_up_tokenization_spaces=False) for ids in _ids(found)]
    assert all(len(ids) == 48 for ids in _ids(found)) and all(window in text for window in decoded)
    where = [text.find(window) for window in decoded]
    assert min(where) < len(text) / 4 and max(where) > 3 * len(text) / 4
    assert _ids(load_calibration(CALIB_TEXT, tokenizer, nsamples=32, seqlen=48, seed=5)) == _ids(found)
    assert _ids(load_calibration(CALIB_TEXT, tokenizer, nsamples=32, seqlen=48, seed=6)) != _ids(found)
    shard = load_calibration(CALIB_TEXT, tokenizer, nsamples=32, seqlen=48, seed=5, shard=(1, 3))
    assert _ids(shard) == _ids(found)[1::3]


def test_a_window_drawn_near_the_end_is_the_last_tokens(tokenizer):
    size = CALIB_TEXT.stat().st_size
    with CALIB_TEXT.open("rb") as f:
        ids = samples._tokens_at(f, CALIB_TEXT, size - 10, size, tokenizer, 40)
    assert len(ids) == 40
    assert CALIB_TEXT.read_text(encoding="utf-8").endswith(tokenizer.decode(ids, clean_up_tokenization_spaces=False))


_CHILD = textwrap.dedent("""
    import json, sys
    from tamp_fx.calibrate.samples import load_calibration
    from tamp_fx.errors import TampError
    from tamp_fx.load.source import load_processor, resolve_source

    def rss(field):                                # bytes; VmHWM: the peak since the last reset
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))

    tokenizer = load_processor(resolve_source(sys.argv[1]))
    tokenizer("warm the tokenizer up " * 1000)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")                           # reset the peak (ru_maxrss would keep the parent's at fork)
    base = rss("VmRSS")
    found = load_calibration(sys.argv[2], tokenizer, nsamples=16, seqlen=128)
    text = rss("VmHWM") - base
    try:
        load_calibration(sys.argv[3], tokenizer, nsamples=16)
        refused = ""
    except TampError as error:
        refused = str(error)
    print(json.dumps({"text": text, "jsonl": rss("VmHWM") - base, "shapes": [list(s["input_ids"].shape) for s in found],
                      "refused": refused}))
""")


def _write_repeated(path: Path, pattern: bytes, size: int, head: bytes = b"", tail: bytes = b"") -> Path:
    block = pattern * 4096
    with path.open("wb") as f:
        f.write(head)
        for _ in range(size // len(block)):
            f.write(block)
        f.write(tail)
    return path


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_200_mb_single_line_is_read_in_bounded_memory(tmp_path, llama):
    """A 200 MB text file on one line is windowed, and a 200 MB JSONL record refused, each with
    a peak memory growth far below the file's size (the whole-file reader took gigabytes)."""
    size, pattern = 200 << 20, "the quick brown fox jumps over the lazy dog while café tables wait ".encode()
    text = _write_repeated(tmp_path / "one-line.txt", pattern, size)
    jsonl = _write_repeated(tmp_path / "one-record.jsonl", pattern, size,
                            b'{"conversations": [{"from": "human", "value": "', b'"}]}\n')
    with text.open("rb") as f:
        assert text.stat().st_size > 190 << 20 and b"\n" not in f.read(1 << 20)
    run = subprocess.run([sys.executable, "-c", _CHILD, str(llama), str(text), str(jsonl)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["shapes"] == [[1, 128]] * 16
    assert "line 1 is over" in report["refused"]
    assert report["text"] < 100 << 20 and report["jsonl"] < 100 << 20, report


# --- fuzzing -----------------------------------------------------------------------------------

_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(data=st.one_of(st.binary(max_size=600), st.text(max_size=300).map(str.encode)),
       name=st.sampled_from(["c.txt", "c.jsonl", "c.json", "c.TXT"]),
       piece=st.sampled_from([1, 3, 64, 1 << 20]), stream=st.booleans())
def test_any_bytes_give_samples_or_one_tamp_error(tmp_path_factory, tokenizer, data, name, piece, stream):
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "PIECE", piece)
        patch.setattr(samples, "STREAM_ABOVE", 16 if stream else samples.STREAM_ABOVE)
        try:
            calibration_inputs(path)
            found = load_calibration(path, tokenizer, nsamples=3, seqlen=4)
        except TampError as error:
            assert len(str(error).splitlines()) == 1
            return
    assert found and all(s["input_ids"].dim() == 2 for s in found)


def _first_invalid(data: bytes) -> int | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start
    return None


@_FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode)),
       piece=st.sampled_from([1, 2, 5, 1 << 20]))
def test_pieces_are_the_text_or_stop_at_the_first_byte_that_is_not(tmp_path_factory, data, piece):
    """Read in pieces of any size, a file is its UTF-8 text (universal newlines), or refused at
    the first byte that is not text, as the whole bytes decoded at once say."""
    path = tmp_path_factory.mktemp("fuzz") / "c.txt"
    path.write_bytes(data)
    binary, invalid = files.binary_at(data, 0), _first_invalid(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "PIECE", piece)
        try:
            text = "".join(files.pieces(path))
        except TampError as error:
            at = _offset(str(error), r"\((?:byte|invalid byte at offset) (\d+)\)")
            if "looks binary" in str(error):
                assert binary is not None and at == min(i for i in (binary, invalid) if i is not None)
            else:
                assert at == invalid and (binary is None or binary > invalid)
            return
    assert binary is None and invalid is None
    assert text == data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
