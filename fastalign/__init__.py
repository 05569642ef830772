"""fastalign: fast, exact test-time alignment decoding for Hugging Face causal LMs."""

from .api import DecodeOutput, Engine, decode
from .models import CausalLM, InputError, RewardModel
from .native import native_available, native_info

__all__ = ["decode", "Engine", "DecodeOutput", "CausalLM", "RewardModel", "InputError", "native_available", "native_info"]
__version__ = "0.1.0"
