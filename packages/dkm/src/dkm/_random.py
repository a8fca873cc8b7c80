"""scikit-learn's ``random_state`` semantics (None, int or RandomState) for torch generators."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils import check_random_state

from klcore.errors import ConfigError

RandomState = int | np.random.RandomState | None


def torch_seed(random_state: RandomState) -> int:
    """An integer seed for a ``torch.Generator``: the int itself, or a draw from the RandomState
    (None: numpy's global RandomState, so repeated calls differ, as in scikit-learn)."""
    if isinstance(random_state, (bool, np.bool_)):
        raise ConfigError(f"random_state must be None, an int or a numpy RandomState, got {random_state!r}")
    if isinstance(random_state, (int, np.integer)):
        if random_state < 0:
            raise ConfigError(f"random_state must be >= 0, got {random_state}")
        return int(random_state)
    try:
        rng = check_random_state(random_state)
    except ValueError as error:
        raise ConfigError(
            f"random_state must be None, an int or a numpy RandomState, got {type(random_state).__name__}"
        ) from error
    return int(rng.randint(np.iinfo(np.int32).max))


def torch_generator(random_state: RandomState) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``random_state``."""
    return torch.Generator().manual_seed(torch_seed(random_state))
