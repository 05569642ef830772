"""Layer 3, the model layer: causal LMs and reward models that own batched KV caches."""

from .causal_lm import CachedModel, CausalLM
from .reward import RewardModel

__all__ = ["CachedModel", "CausalLM", "RewardModel"]
