"""Shared fixtures: a tiny model, the character tokenizer and a plugin manager without entry points."""

from __future__ import annotations

import pytest
import torch

from klcore.plugins import build_plugin_manager


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tokenizer():
    from klcore.toy import char_tokenizer

    return char_tokenizer()


@pytest.fixture
def tiny_model():
    from klcore.toy import tiny_causal_lm, tiny_config

    return tiny_causal_lm(tiny_config("tiny"), seed=0)


@pytest.fixture
def plugins():
    """Built-ins only: tests never depend on what happens to be installed."""
    return build_plugin_manager(load_entrypoints=False)
