"""Random weights for a built model (benchmarks and tests that need no checkpoint).

Linear weights, fp32 routers and the embedding are normal(0, std) in bf16 (norms and router correction biases
stay 1 and 0); quantized Linears get that
bf16 weight quantized through ``quantrl.formats`` (INT with the slime/QAT convention, qmax = 2^(b-1)-1),
exactly as a converter or a weight update would produce it.
"""

from __future__ import annotations

import torch

from quantrl.formats import encode_e8m0, pack_int, pack_nvfp4, quantize_fp8, quantize_int, quantize_nvfp4
from quantrl.model.decoder import Decoder
from quantrl.model.linear import Bf16Linear, Fp8Linear, Nvfp4Linear, W4A16Linear
from quantrl.model.moe import Fp32Router
from quantrl.model.state import linear_modules


def random_init_(model: Decoder, seed: int = 0, std: float = 0.02) -> Decoder:
    dev = model.device
    g = torch.Generator(device=dev).manual_seed(seed)
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        emb.normal_(0.0, std, generator=g)
        for lin in linear_modules(model).values():
            if lin.bias is not None:
                lin.bias.normal_(0.0, std, generator=g)
            if isinstance(lin, Bf16Linear):
                if lin.weight is not emb:  # a tied lm_head is the embedding
                    lin.weight.normal_(0.0, std, generator=g)
                continue
            w = torch.empty(lin.out_features, lin.in_features, dtype=torch.bfloat16, device=dev)
            w.normal_(0.0, std, generator=g)
            lin.restore_weights_before_loading()
            if isinstance(lin, W4A16Linear):
                qmax = (1 << (lin.num_bits - 1)) - 1
                q, s = quantize_int(w, lin.num_bits, lin.group_size, qmax, lin.weight_scale.dtype)
                lin.load_({"weight_packed": pack_int(q, lin.num_bits), "weight_scale": s})
            elif isinstance(lin, Nvfp4Linear):
                codes, s, gs = quantize_nvfp4(w)
                lin.load_({"weight_packed": pack_nvfp4(codes), "weight_scale": s, "weight_global_scale": gs})
            elif isinstance(lin, Fp8Linear):
                q, s = quantize_fp8(w, lin.strategy, lin.block_size, lin.scale_fmt)
                dt = lin.weight_scale_tensor.dtype
                lin.load_({"weight": q, lin.scale_name: encode_e8m0(s) if dt == torch.uint8 else s.to(dt)})
            lin.post_process_weights()
        for m in model.modules():
            if isinstance(m, Fp32Router):
                m.weight.normal_(0.0, std, generator=g)
    return model
