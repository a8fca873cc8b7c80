"""Worker of ``test_probe_resume.py`` (run under ``torch.distributed.run`` with 2 CPU processes, gloo).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 _resume_worker.py ROOT``. Runs the
probe's uninterrupted run in ``ROOT/whole``, then an interrupted one in ``ROOT/cut`` and its resume.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from test_probe_resume import _Crash, _plugins, _trainer


def main(root: str) -> None:
    _trainer(Path(root) / "whole", _plugins()).train()
    with contextlib.suppress(KeyboardInterrupt):  # the simulated interruption at step 3
        _trainer(Path(root) / "cut", _plugins(("crash", _Crash()))).train()
    trainer = _trainer(Path(root) / "cut", _plugins(), resume=True)
    trainer.train()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
