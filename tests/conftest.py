"""Shared pytest configuration: the `slow` marker and the session-wide fixtures: the tiny
targets, the tiny prepared dataset (``data_dir``) and the one launch of the DSPARK_SPEC §13
invariants worker (``spec_invariant_runs``, shared by test_invariants.py and test_losses.py)."""

import pytest

from tests.tiny_models import make_tiny_target


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: needs the real SmolLM2-135M target or takes long; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Tiny random Llama target (6 layers, hidden 64, 4/2 heads, vocab 320, tied)."""
    return make_tiny_target(tmp_path_factory.mktemp("tiny_llama"), family="llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """Tiny random Qwen3 target (6 layers, hidden 64, 4/2 heads, vocab 320 with 8 spare
    rows beyond the 312-token tokenizer, untied LM head, Qwen3-style template)."""
    return make_tiny_target(tmp_path_factory.mktemp("tiny_qwen3"), family="qwen3")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny prepared dataset (tools/prepare_data.py on 48 random chats for the tiny Llama
    target), for the torchrun runs of tests.launcher.run. Read only: a test that changes it
    works on a copy."""
    from tests.launcher import chat_file, prepare_tiny_data

    root = tmp_path_factory.mktemp("pretrain_data")
    return prepare_tiny_data(chat_file(root / "c.jsonl"), tiny_llama_dir, root / "data")


@pytest.fixture(scope="session")
def spec_invariant_runs():
    """Per-rank results of tests.spec_invariants.worker: ONE launch of two gloo processes for
    tests/test_invariants.py and tests/test_losses.py together."""
    from tests.launcher import run_distributed
    from tests.spec_invariants import worker

    return run_distributed(worker, 2)
