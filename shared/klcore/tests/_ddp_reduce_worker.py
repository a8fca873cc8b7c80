"""Worker of ``test_reduce.py``'s two-process test (run under ``torch.distributed.run``, CPU, gloo).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 _ddp_reduce_worker.py IN OUT``.
``IN`` holds the global batch, the initial weights and each rank's micro-batch row ranges. For
every aggregation mode each rank computes the step's global counts from its whole local share,
back-propagates each micro-batch's ``aggregate(..., counts=counts)`` through a DDP-wrapped linear
model (no gradient sync on the first micro-batch) and saves the synchronised gradient to
``OUT.rank<i>``.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))  # import the test module next to this file

from test_reduce import _values

from klcore.reduce import MODES, aggregate, global_counts


def main(inputs: str, out: str) -> None:
    acc = Accelerator(cpu=True)
    data = torch.load(inputs, weights_only=True)
    x, mask, shares = data["x"], data["mask"], data["shares"].tolist()
    rank = acc.process_index
    micro = shares[rank]
    lo, hi = micro[0][0], micro[-1][1]

    model = torch.nn.Linear(x.shape[-1], 3)
    model.load_state_dict(data["state"])
    ddp = acc.prepare(model)
    inner = acc.unwrap_model(ddp)

    def step(loss_of_micro_batch) -> dict[str, torch.Tensor]:
        for p in inner.parameters():
            p.grad = None
        for i, (a, b) in enumerate(micro):
            with acc.no_sync(ddp) if i == 0 else nullcontext():
                acc.backward(loss_of_micro_batch(a, b))
        return {name: p.grad.detach().clone() for name, p in inner.named_parameters()}

    grads = {}
    for mode in MODES:
        counts = global_counts(mask[lo:hi], accelerator=acc)  # once per optimiser step, whole local share
        grads[mode] = step(
            lambda a, b, mode=mode, counts=counts: aggregate(_values(ddp, x[a:b]), mask[a:b], mode, counts=counts)
        )

    # control: counts reduced per micro-batch instead of per step (every rank calls it once per micro-batch)
    naive = step(lambda a, b: aggregate(_values(ddp, x[a:b]), mask[a:b], "token-mean", accelerator=acc))

    torch.save(
        {
            "num_processes": acc.num_processes,
            "process_index": rank,
            "distributed_type": acc.distributed_type.name,
            "ddp_wrapped": isinstance(ddp, torch.nn.parallel.DistributedDataParallel),
            "grads": grads,
            "naive": naive,
        },
        f"{out}.rank{rank}",
    )
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
