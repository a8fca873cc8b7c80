"""Shared fixtures: seeded RNG and a plugin manager holding klcore's built-ins and this package."""

from __future__ import annotations

import pytest
import torch

from klcore.plugins import build_plugin_manager


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def plugins():
    """klcore's built-ins plus entropy_rl's plugin only: tests never depend on what else is installed."""
    from entropy_rl import plugin

    return build_plugin_manager(plugins=[("entropy_rl", plugin)], load_entrypoints=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trl: runs against the real TRL (skipped where trl is absent)")
