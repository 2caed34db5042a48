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

from dataclasses import dataclass, replace


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


def apply_slime_env(cfg, given: set[str]):
    """``cfg`` (an ``RLConfig``) as slime's QAT switches ask for, for users who launch with them set:
    ``OPEN_TRAINING_INT4_FAKE_QAT_FLAG=1`` needs a recipe that trains with INT4 QAT (the default
    ``int4-qat`` does), ``=0`` one that does not; ``OPEN_TRAINING_INT4_GROUP_SIZE`` sets ``group_size``.
    A switch that contradicts a flag on the command line (``given``) is a ``ValueError``, not a choice."""
    from quantrl.train.qat import ENV_FLAG, ENV_GROUP, slime_env

    on, group = slime_env()
    qat = get_recipe(cfg.recipe).train_mode == "int4-qat"
    if on is not None and on != qat:
        how = "--recipe" if "recipe" in given else "the default recipe"
        want = "int4-qat or int4-qat-bf16-rollout" if on else "e.g. int4-ptq or bf16"
        raise ValueError(f"{ENV_FLAG}={int(on)} turns INT4 QAT {'on' if on else 'off'}, but {how} {cfg.recipe!r} "
                         f"{'does not train' if on else 'trains'} with it: choose {want}, or unset {ENV_FLAG}")
    if group is not None and group != cfg.group_size:
        if "group_size" in given:
            raise ValueError(f"{ENV_GROUP}={group} and --group-size {cfg.group_size} disagree")
        cfg = replace(cfg, group_size=group)
    return cfg
