"""Worker of ``test_global_scope.py`` (run under ``torch.distributed.run`` with 2 CPU processes, gloo).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 _two_process_worker.py IN OUT``.
``IN`` holds a global batch and each rank's row range and width; every rank computes the global-scope
selections and covariances of its rows (Clip-Cov's generator seeded identically) and saves them to
``OUT.rank<i>``.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from entropy_rl import clip_cov_selection, kl_cov_selection, token_covariance


def main(inputs: str, out: str) -> None:
    acc = Accelerator(cpu=True)
    data = torch.load(inputs, weights_only=True)
    rank = acc.process_index
    lo, hi, width = data["shares"][rank].tolist()
    old, new, adv, mask = (data[k][lo:hi, :width] for k in ("old", "new", "adv", "mask"))
    options = data["clip_options"]
    result = {
        "clip_cov": clip_cov_selection(
            old, new, adv, mask, ratio=float(options[0]), cov_bounds=(float(options[1]), float(options[2])),
            accelerator=acc, generator=torch.Generator().manual_seed(int(data["seed"])),
        ),
        "kl_cov": kl_cov_selection(new, adv, mask, ratio=float(data["kl_ratio"]), accelerator=acc),
        "cov": token_covariance(new, adv, mask, accelerator=acc),
        "num_processes": acc.num_processes,
    }
    torch.save(result, f"{out}.rank{rank}")
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
