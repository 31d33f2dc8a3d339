"""Models: the recursive core (flat | dense TRM | MoEUT), its layers and the KV cache."""

from ..config import ModelConfig
from .trm import Model, act_loss, act_step, initial_carry, step_loss


def build_model(config: ModelConfig) -> Model:
    """A model initialised from the reference's distributions (truncated normal for the dense
    layers, plain normal with renormalised selectors for the MoE layers)."""
    return Model(config)


__all__ = ["Model", "ModelConfig", "act_loss", "act_step", "build_model", "initial_carry",
           "step_loss"]
