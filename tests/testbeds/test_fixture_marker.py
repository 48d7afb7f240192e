"""Which fixture a model directory is: the config.json key the fixtures' configs are built with,
which transformers keeps through saving and loading."""
from __future__ import annotations

import json

from tamp_fx.testbeds import vqa
from tamp_fx.testbeds.fixture.model import MARKER
from tamp_fx.testbeds.fixtures import FIXTURES


def test_every_fixture_has_the_held_out_split_of_its_name():
    assert set(FIXTURES.names()) == set(vqa.SPLITS)


def test_the_marker_given_to_a_config_survives_saving_loading_and_saving_again(tiny_models, tmp_path):
    from transformers import AutoConfig
    tiny = AutoConfig.from_pretrained(tiny_models("llava"))
    config = type(tiny)(vision_config=tiny.vision_config, text_config=tiny.text_config, **{MARKER: "next"})
    config.save_pretrained(tmp_path / "built")
    AutoConfig.from_pretrained(tmp_path / "built").save_pretrained(tmp_path / "saved again")
    for name in ("built", "saved again"):
        assert json.loads((tmp_path / name / "config.json").read_text())[MARKER] == "next"
