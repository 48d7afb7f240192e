"""`apply` copies what a checkpoint directory holds besides its weights, and never the
original weights in another format, which beside the pruned safetensors would be the unpruned
model under another name."""
from __future__ import annotations

import shutil

from safetensors.torch import load_file

from support.cli import invoke


def test_apply_copies_companions_but_not_unpruned_weights_in_other_formats(tmp_path, llama, saved_plan, caplog):
    model = shutil.copytree(llama, tmp_path / "model")
    (model / "README.md").write_text("model card\n")
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("kept\n")
    stale = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.gguf", "flax_model.msgpack")
    for name in stale:
        (model / name).write_bytes(b"original weights")
    out = tmp_path / "pruned"
    result = invoke(["apply", model, saved_plan, "--out", out])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "extra", "config.json"} <= names and (out / "extra" / "notes.txt").read_text() == "kept\n"
    assert not names & set(stale)
    assert all(name in caplog.text + result.output for name in stale), "the user is told what was left behind"
    assert all((model / name).read_bytes() == b"original weights" for name in stale), "the input is unchanged"
    pruned = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert any(bool((v == 0).any()) for k, v in pruned.items() if k.endswith("q_proj.weight"))
