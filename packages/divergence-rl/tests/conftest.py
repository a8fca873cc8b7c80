"""Shared fixtures: the character tokenizer, a tiny model, and a plugin manager with only this package."""

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
    """Built-ins plus divergence-rl: tests never depend on what else happens to be installed."""
    from divergence_rl import plugin

    return build_plugin_manager(plugins=[("divergence_rl", plugin)], load_entrypoints=False)
