"""Model families behind one spec (spec.py), stage cutting (stage.py), building and the loss."""

from hvdllm.models.build import (
    build_model,
    count_parameters,
    empty_model,
    fill_weights,
    flops_per_token,
    model_config,
    model_from_config,
)
from hvdllm.models.loss import causal_lm_loss
from hvdllm.models.spec import ModelSpec, spec_for
from hvdllm.models.stage import Stage, partition_for

__all__ = ["ModelSpec", "Stage", "build_model", "causal_lm_loss", "count_parameters",
           "empty_model", "fill_weights", "flops_per_token", "model_config", "model_from_config",
           "partition_for", "spec_for"]
