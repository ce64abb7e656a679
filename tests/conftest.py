"""Shared pytest configuration: the `slow` marker and session-wide tiny targets."""
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
