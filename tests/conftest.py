import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # tests/hf_oracle.py

from k2lite import ops
from k2lite.testing.random_model import preset, write_random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["ref"] + [b for b in ("cpu", "cuda") if ops.available(b)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random checkpoint in the release layout (INT4 experts), written once."""
    path = str(tmp_path_factory.mktemp("tiny"))
    write_random_model(path, preset("tiny"), seed=0)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(name, **config overrides) -> path of a random checkpoint (cached per name)."""
    made = {}

    def make(name, seed=0, int4_experts=True, peak=1.0, **overrides):
        if name not in made:
            path = str(tmp_path_factory.mktemp(name))
            write_random_model(path, preset("tiny", **overrides), seed=seed, int4_experts=int4_experts, peak=peak)
            made[name] = path
        return made[name]
    return make
