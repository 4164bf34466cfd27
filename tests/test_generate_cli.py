"""``python -m experiments.generate``: the run's model is read from its name,
and ``--hf`` with token ids prints transformers' greedy continuation."""

import argparse
import json

import numpy as np
import pytest

from experiments import generate
from helpers.hf_fixtures import FIXTURES, expected


def _args(**kw):
    base = dict(preset=None, ffn=None, capacity_factor=None, moe_every=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize(
    "name, want",
    [
        ("xs-dmoe", dict(preset="xs", ffn="dmoe", capacity_factor=1.0, moe_every=1)),
        ("s-moe-cf1.5", dict(preset="s", ffn="moe", capacity_factor=1.5, moe_every=1)),
        ("xs-dmoe-every2", dict(preset="xs", ffn="dmoe", capacity_factor=1.0, moe_every=2)),
    ],
)
def test_model_from_run_name(tmp_path, name, want):
    run = tmp_path / "some-dir"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"name": name}))
    assert generate.run_model_args(run, _args()) == want
    assert generate.run_model_args(run, _args(ffn="dense"))["ffn"] == "dense"


def test_unknown_run_name_asks_for_flags(tmp_path):
    with pytest.raises(ValueError, match="pass --preset"):
        generate.run_model_args(tmp_path / "mine", _args())


@pytest.mark.slow
def test_hf_token_ids_in_and_out(capsys):
    want = expected("mixtral")
    prompt = " ".join(map(str, want["generate_prompt"][0]))
    generate.main(
        ["--hf", str(FIXTURES / "mixtral"), "--prompt-ids", prompt, "--max-new-tokens", "10"]
    )
    printed = [int(t) for t in capsys.readouterr().out.split()]
    np.testing.assert_array_equal(printed, want["generated"][0, 6:])
