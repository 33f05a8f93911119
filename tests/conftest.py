"""Shared test fixtures: where the real corpora are, and a fixed seed for every test."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir():
    """The folder of real corpora: $DEFINE_TEST_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("DEFINE_TEST_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture
def data_root():
    """Real PTB / WikiText-2 / Multi30k, or a skip that says how to provide them."""
    d = shared_data_dir()
    if not (d / "ptb" / "train.txt").exists():
        pytest.skip(f"real corpora not found at {d}: set DEFINE_TEST_DATA to a folder "
                    "holding ptb/, wikitext-2/ and multi30k/ to run this test")
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _define_softmax_nll(monkeypatch):
    """fast.compiled swaps define.softmax_nll for its written-out twin and runs
    AdaptiveSoftmax._plan outside compiled graphs, for the process: each test starts with
    define's own."""
    import define
    monkeypatch.setattr(define, 'softmax_nll', define.softmax_nll)
    monkeypatch.setattr(define.AdaptiveSoftmax, '_plan', define.AdaptiveSoftmax._plan)
