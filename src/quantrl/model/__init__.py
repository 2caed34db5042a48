"""One decoder definition (Qwen3 / Qwen2 / Llama / Mistral) for training and rollout, its Linear
variants (BF16, FP8 W8A8, INT4/INT8 W4A16) and HF-directory loading."""

from quantrl.model.config import ModelConfig, RopeConfig
from quantrl.model.decoder import Decoder, KVContext
from quantrl.model.linear import Bf16Linear, Fp8Linear, Nvfp4Linear, QLinear, W4A16Linear, WeightSpec
from quantrl.model.load import build_model, load_model
from quantrl.model.quant_scheme import QuantScheme
from quantrl.model.random_init import random_init_
from quantrl.model.state import dequantized_weights, engine_state, tensor_index, weight_units

Fp8BlockLinear = Fp8Linear  # the name the issue uses; one class covers block, channel and tensor scales

__all__ = [
    "Bf16Linear",
    "Decoder",
    "Fp8BlockLinear",
    "Fp8Linear",
    "KVContext",
    "ModelConfig",
    "Nvfp4Linear",
    "QLinear",
    "QuantScheme",
    "RopeConfig",
    "W4A16Linear",
    "WeightSpec",
    "build_model",
    "dequantized_weights",
    "engine_state",
    "load_model",
    "random_init_",
    "tensor_index",
    "weight_units",
]
