from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 40, (3, 10), generator=g)
