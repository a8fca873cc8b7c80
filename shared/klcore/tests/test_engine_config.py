"""What the trainer accepts from accelerate's engine settings (the engines themselves run in
``integration-tests/test_engines.py``, which needs several processes and DeepSpeed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from klcore.errors import ConfigError
from klcore.trainer import TrainerConfig
from klcore.trainer.base import _check_engine


def _deepspeed(**config) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=dict(config))
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, gradient_accumulation_steps=1,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


def test_deepspeed_auto_entries_are_filled_from_the_trainer_config() -> None:
    acc = _deepspeed(gradient_accumulation_steps="auto", gradient_clipping="auto", train_micro_batch_size_per_gpu="auto")
    _check_engine(acc, TrainerConfig(max_grad_norm=0.5, micro_batch_size=4))
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 4
    acc = _deepspeed(gradient_clipping=0.5, train_micro_batch_size_per_gpu=2)  # explicit, consistent values stay
    _check_engine(acc, TrainerConfig(max_grad_norm=0.5))
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2


@pytest.mark.parametrize(
    ("config", "match"),
    [({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps = 4"), ({"gradient_clipping": 2.0}, "max_grad_norm")],
)
def test_deepspeed_settings_the_loop_cannot_honour_are_refused(config: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _check_engine(_deepspeed(**config), TrainerConfig(max_grad_norm=1.0))


def test_fsdp1_is_refused_and_fsdp2_accepted() -> None:
    def fsdp(version: int) -> SimpleNamespace:
        return SimpleNamespace(distributed_type=DistributedType.FSDP, gradient_accumulation_steps=1,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))

    with pytest.raises(ConfigError, match="FSDP2"):
        _check_engine(fsdp(1), TrainerConfig())
    _check_engine(fsdp(2), TrainerConfig())
