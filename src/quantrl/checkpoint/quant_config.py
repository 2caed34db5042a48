"""``quantization_config`` dicts that inference engines (SGLang, vLLM, transformers) read.

Two dialects: DeepSeek-style ``quant_method: fp8`` for 128×128 FP8 blocks (what slime writes and SGLang
loads), and compressed-tensors (``float-quantized`` for FP8 channel/tensor/block, ``pack-quantized`` for
INT4/INT8 weight-only, ``mxfp8-quantized`` for MXFP8 W8A8, ``nvfp4-pack-quantized`` for NVFP4 weight-only:
the NVFP4A16 preset).
"""

from __future__ import annotations


def fp8_block_config(block_size: tuple[int, int], not_converted: list[str], scale_fmt: str | None) -> dict:
    cfg = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block_size),
        "modules_to_not_convert": not_converted,
    }
    if scale_fmt:
        cfg["scale_fmt"] = scale_fmt
    return cfg


def _ct(format_: str, weights: dict, input_activations: dict | None, ignore: list[str]) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": format_,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": input_activations,
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def ct_fp8_config(strategy: str, block_size: tuple[int, int], ignore: list[str]) -> dict:
    """compressed-tensors FP8 (W8A8, dynamic activations): channel -> per-token, block -> 1×128 groups."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False, "observer": "minmax"}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "observer": None}
    if strategy == "block":
        weights["block_structure"] = list(block_size)
        acts.update(strategy="group", group_size=block_size[1])
    else:
        acts["strategy"] = "token" if strategy == "channel" else "tensor"
    return _ct("float-quantized", weights, acts, ignore)


def ct_int_config(num_bits: int, group_size: int, ignore: list[str]) -> dict:
    """compressed-tensors weight-only group INT (W4A16 / W8A16) in ``pack-quantized`` format."""
    weights = {
        "num_bits": num_bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return _ct("pack-quantized", weights, None, ignore)


def ct_nvfp4_config(ignore: list[str]) -> dict:
    """compressed-tensors NVFP4A16: e2m1 weights, e4m3 scales per 16 (``tensor_group``: plus a global scale)."""
    weights = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "strategy": "tensor_group",
        "group_size": 16,
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn",
        "observer": "minmax",
    }
    return _ct("nvfp4-pack-quantized", weights, None, ignore)


def ct_mxfp8_config(ignore: list[str]) -> dict:
    """compressed-tensors MXFP8 (W8A8): e4m3 weights and dynamic activations, E8M0 (uint8) scales per 1×32."""
    group = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group", "group_size": 32,
             "scale_dtype": "torch.uint8"}
    weights = {**group, "dynamic": False, "observer": "minmax"}
    acts = {**group, "dynamic": True, "observer": None}
    return _ct("mxfp8-quantized", weights, acts, ignore)
