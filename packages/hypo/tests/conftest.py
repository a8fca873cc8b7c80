from __future__ import annotations

import hypo.plugin
import pytest
import torch
from hypo.data import PreferencePair, TokenizedPairs, tokenize_pairs

from klcore.plugins import Plugins, build_plugin_manager
from klcore.toy import char_tokenizer

PAIRS = [
    PreferencePair("1+2=", "3", "4"),
    PreferencePair("10+5=", "15", "51"),
    PreferencePair("7+7=", "14", "41"),
    PreferencePair("3+30=", "33", "3"),
    PreferencePair("2+2=", "4", "22"),
    PreferencePair("9+1=", "10", "1"),
]


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tokenizer():  # type: ignore[no-untyped-def]
    return char_tokenizer()


@pytest.fixture
def pairs(tokenizer) -> TokenizedPairs:  # type: ignore[no-untyped-def]
    return tokenize_pairs(PAIRS, tokenizer, max_length=16)


@pytest.fixture
def plugins() -> Plugins:
    return build_plugin_manager(plugins=[("hypo", hypo.plugin)], load_entrypoints=False)
