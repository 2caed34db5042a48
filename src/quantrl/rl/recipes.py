"""The training recipes: which precision trains and which one samples.

    bf16                    BF16 train, BF16 rollout                    (the floor)
    fp8-rollout             BF16 train, FP8 128x128-block rollout        (weights quantized at every sync)
    fp8                     FP8 blockwise train, FP8 rollout
    int4-qat                INT4 QAT train (fake quant + STE), INT4 W4A16 rollout
    int4-ptq                BF16 train, INT4 rollout                    (ablation: no QAT)
    int4-qat-bf16-rollout   INT4 QAT train, BF16 rollout                (ablation: QAT without real quant)
    mxfp8-rollout           BF16 train, MXFP8 rollout (1x32 blocks, E8M0 scales; emulated on Hopper)
    mxfp8-qat               MXFP8 QAT train (weights and activations fake-quantized), MXFP8 rollout
    nvfp4-qat               NVFP4 QAT train, NVFP4A16 rollout           (the next formats MISSION names)
    nvfp4-ptq               BF16 train, NVFP4A16 rollout                (ablation: no QAT)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    train_mode: str
    "bf16 | fp8 | int4-qat | nvfp4-qat | mxfp8-qat (quantrl.train.trainer.TrainConfig.mode)"
    rollout: str
    "bf16 | fp8 | mxfp8 | int4 | nvfp4: the rollout engine's weight format"


RECIPES: dict[str, Recipe] = {
    "bf16": Recipe("bf16", "bf16"),
    "fp8-rollout": Recipe("bf16", "fp8"),
    "fp8": Recipe("fp8", "fp8"),
    "int4-qat": Recipe("int4-qat", "int4"),
    "int4-ptq": Recipe("bf16", "int4"),
    "int4-qat-bf16-rollout": Recipe("int4-qat", "bf16"),
    "mxfp8-rollout": Recipe("bf16", "mxfp8"),
    "mxfp8-qat": Recipe("mxfp8-qat", "mxfp8"),
    "nvfp4-qat": Recipe("nvfp4-qat", "nvfp4"),
    "nvfp4-ptq": Recipe("bf16", "nvfp4"),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]
