"""Export of a complex and its Hodge parts to a torch-geometric ``Data`` object (``pip install hodgecover[pyg]``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hodgecover.complex import HodgeDecomposition, SimplicialComplex, as_edge_signal
from hodgecover.extras import MissingExtraError


def to_pyg(complex_: SimplicialComplex, parts: HodgeDecomposition | None = None, edge_signal: Any = None) -> Any:
    """``Data`` with ``num_nodes``, ``edge_index [2, |E|]`` (i < j), ``triangle_index [3, |T|]`` and, when given,
    ``edge_signal``, ``gradient``, ``curl``, ``harmonic`` ``[|E|]`` float32 and ``node_potential [n]``."""
    try:
        from torch_geometric.data import Data
    except ImportError as err:
        raise MissingExtraError(
            f"to_pyg needs torch-geometric, which is not importable ({err}); install the extra: "
            "pip install 'hodgecover[pyg]'"
        ) from err

    def index(simplices: list, width: int) -> torch.Tensor:
        return torch.tensor(np.asarray(simplices, dtype=np.int64).reshape(-1, width).T.copy())

    data = Data(num_nodes=complex_.num_vertices, edge_index=index(complex_.edges, 2),
                triangle_index=index(complex_.triangles, 3))
    if edge_signal is not None:
        data.edge_signal = torch.as_tensor(as_edge_signal(complex_, edge_signal), dtype=torch.float32)
    if parts is not None:
        for name in ("gradient", "curl", "harmonic"):
            setattr(data, name, torch.as_tensor(getattr(parts, name), dtype=torch.float32))
        data.node_potential = torch.as_tensor(parts.potential, dtype=torch.float32)
    return data


__all__ = ["MissingExtraError", "to_pyg"]
