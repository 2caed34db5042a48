"""The RL loop (``quantrl train``): rollout -> reward -> train -> sync, every step.

Per step: the engine samples ``n`` responses for each of ``prompts_per_step`` prompts (its logprobs are the
rollout policy's); rewards give group-normalized advantages (GRPO); the trainer recomputes the same tokens'
logprobs (the train policy), which gives the train-rollout mismatch; one optimizer step on the clipped
policy loss (optionally TIS/MIS-corrected with the rollout logprobs); and the trainer's weights are
converted to the engine's format and loaded (``quantrl.sync``). Metrics go to ``RUN/metrics.jsonl``.

Placement. ``local``: trainer and engine in this process, one after the other. ``ray``
(``train_on_ray``): the trainer replicas and the engines are Ray actors in one torch.distributed world
(``quantrl.sync.ray_engines``); this process only drives ``RLRun``'s methods (``drive``). With
``--async-rollout`` the engines sample step t+1 while step t trains.

Determinism (what ``--resume`` relies on): the data order is a function of the seed, sampling is seeded
by (seed, step), the checkpoint holds the optimizer's fp32 masters and states and, with async rollout,
the samples in flight, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from quantrl.rl.recipes import get_recipe
from quantrl.rl.run_dir import RunDir

LR_DECAY_STYLES = ("constant", "linear", "cosine")
PLACEMENTS = ("local", "ray")


@dataclass(frozen=True)
class RLConfig:
    recipe: str = "int4-qat"
    ("precision recipe: bf16 | fp8-rollout | fp8 | int4-qat | int4-ptq | int4-qat-bf16-rollout | mxfp8-rollout | "
     "mxfp8-qat | nvfp4-qat | nvfp4-ptq")
    model: str = ""
    "HF model directory to start from (default: the embedded warm-started model)"
    run_dir: str = "runs/default"
    "where config, metrics and checkpoints go"
    resume: bool = False
    "continue run_dir from its latest checkpoint"
    prompt_data: str = ""
    "JSONL/parquet prompts (slime --prompt-data); empty: the synthetic arithmetic task"
    input_key: str = "prompt"
    "prompt column (slime --input-key)"
    label_key: str = "label"
    "answer column (slime --label-key); a dotted key reads a nested field (verl's reward_model.ground_truth)"
    apply_chat_template: bool = False
    "render prompts with the tokenizer's chat template"
    eval_data: str = ""
    "held-out prompts file; empty: a held-out split (eval_size) of the prompts"
    metadata_keys: str = ""
    "comma-separated columns of --prompt-data kept with each prompt and handed to --custom-rm-path's function"
    custom_rm_path: str = ""
    "your reward, module:function or file.py:function, called fn(response, label[, prompt=, metadata=]) -> float (slime --custom-rm-path); '': the math reward"
    custom_env_path: str = ""
    "multi-turn rollouts: env(prompt, transcript) -> next observation text or None (end), module:function or file.py:function; the policy's tokens keep their engine logprobs, observations carry no loss"
    max_turns: int = 4
    "with --custom-env-path: policy turns per episode at most"
    eval_size: int = 64
    "held-out prompts for --eval-interval accuracy"
    difficulty: str = "medium"
    "synthetic task difficulty: easy | medium | hard"
    num_prompts: int = 64
    "synthetic task: distinct training prompts, revisited every few steps (RL goes over its prompt set in epochs)"
    num_steps: int = 40
    "RL steps"
    prompts_per_step: int = 16
    "prompts per rollout batch (slime --rollout-batch-size)"
    n_samples_per_prompt: int = 8
    "samples per prompt: the GRPO group (slime --n-samples-per-prompt)"
    temperature: float = 1.0
    "sampling temperature (slime --rollout-temperature)"
    top_p: float = 1.0
    "nucleus sampling"
    max_new_tokens: int = 48
    "response length limit (slime --rollout-max-response-len)"
    lr: float = 5e-5
    "learning rate (the peak, with a schedule)"
    lr_warmup_steps: int = 0
    "linear warm-up from 0 over this many optimizer steps (slime --lr-warmup-iters)"
    lr_decay_style: str = "constant"
    "after the warm-up: constant | linear | cosine, down to --min-lr at the last optimizer step (slime --lr-decay-style)"
    min_lr: float = 0.0
    "where linear and cosine decay end (slime --min-lr)"
    micro_batch_size: int = 32
    "sequences per forward/backward"
    pack_sequences: bool = False
    "trainer forwards run each micro-batch packed (first-fit into as few rows as fit, attention within each sequence): fewer padded tokens"
    grad_clip: float = 1.0
    "gradient norm clip"
    clip_eps: float = 0.2
    "PPO clip (slime --eps-clip)"
    clip_eps_high: float = 0.28
    "PPO upper clip, DAPO clip-higher (slime --eps-clip-high)"
    advantage_estimator: str = "grpo"
    "grpo (group mean and std) | dr-grpo (mean only) | rloo (leave-one-out mean) | gspo (grpo's, with the sequence-level ratio: set --clip-eps ~3e-4) (slime's flag)"
    num_steps_per_rollout: int = 1
    "optimizer steps per rollout batch, on that many mini-batches of it (slime's flag); > 1 takes PPO's ratio against the sampling policy's logprobs"
    dynamic_sampling: bool = False
    "DAPO dynamic sampling: drop prompts whose samples all got one reward (no gradient) and sample more prompts until --prompts-per-step have a spread"
    overlong_buffer_len: int = 0
    "DAPO soft overlong punishment: the last N tokens before --max-new-tokens cost up to --overlong-penalty-factor of reward"
    overlong_penalty_factor: float = 1.0
    "the penalty at --max-new-tokens (with --overlong-buffer-len)"
    overlong_filter: bool = False
    "DAPO overlong filtering: samples cut at --max-new-tokens carry no loss (their rewards still shape their group's baseline)"
    max_sampling_rounds: int = 4
    "--dynamic-sampling: rollouts of --prompts-per-step fresh prompts per step at most; a step still short trains on the prompts it has"
    kl_coef: float = 0.0
    "k3 KL to the initial policy (slime --kl-loss-coef); > 0 keeps a frozen reference model"
    entropy_coef: float = 0.0
    "entropy bonus (slime --entropy-coef); the policy's entropy on the trained tokens is logged either way"
    is_mode: str = ""
    "train-rollout correction: '' (off), tis (min(rho, cap)), clip (clamp to [cap-low, cap]) or mis (0 outside it)"
    is_cap: float = 2.0
    "upper bound of the importance weights"
    is_cap_low: float = 0.0
    "lower bound for clip / mis (0: 1 / --is-cap)"
    is_level: str = "token"
    "importance ratio per token, per sequence (product) or geometric (per-token mean over the sequence)"
    is_batch_normalize: bool = False
    "scale the importance weights to mean 1 over the step (self-normalized IS)"
    rs_level: str = ""
    "rejection sampling: '' (off), token, sequence or geometric: drop what has a ratio outside [--rs-cap-low, --rs-cap]"
    rs_cap: float = 0.0
    "rejection upper bound (0: --is-cap)"
    rs_cap_low: float = 0.0
    "rejection lower bound (0: 1 / the upper bound)"
    rs_veto_threshold: float = 0.0
    "reject every sample holding a token whose ratio is below this (0: off; e.g. 1e-4)"
    use_rollout_logprobs: bool = False
    "PPO's old policy is the engine's logprobs (slime's flag): the clip then bounds the train-rollout ratio too (not with --is-mode / --rs-level)"
    group_size: int = 128
    "INT4 group size (OPEN_TRAINING_INT4_GROUP_SIZE)"
    qmax: int = 7
    "INT4 range: 7 (absmax/7, [-7, 7]) or 8 (absmax/7.5, [-8, 7])"
    kv_cache_dtype: str = "auto"
    "rollout KV cache: auto (the model dtype) or fp8_e4m3 (SGLang's flag: half the bytes; one fixed scale per layer, the checkpoint's k_scale / v_scale or 1.0)"
    kv_fake_quant: bool = False
    "the trainer's attention rounds K and V as the FP8 KV cache stores them (STE, like QAT for weights): the cache then adds no mismatch"
    fp8_param_gather: bool = False
    "FP8 training: keep the FP8 weight copy for the step"
    optimizer_cpu_offload: bool = False
    "fp32 masters and Adam moments in CPU memory, the optimizer step on the CPU (Megatron/slime's flag)"
    use_distributed_optimizer: bool = False
    "with --dp-size N: each replica keeps the fp32 masters and Adam moments of ~1/N of the parameters (Megatron's flag)"
    update_weights_interval: int = 1
    "sync the trainer's weights to the engines every N steps (slime's flag; and at the last): rollouts in between come from weights up to N-1 steps old, which --is-mode corrects; --eval-interval and --save-interval must be multiples"
    check_weight_update_equal: bool = False
    "verify after every sync that the engine holds exactly the converted weights"
    use_rollout_routing_replay: bool = False
    "MoE models: the trainer (and the --kl-coef reference) uses the experts the engine routed each token to (R3)"
    eval_interval: int = 10
    "evaluate held-out accuracy every N steps (0: never)"
    n_samples_per_eval_prompt: int = 1
    "samples per held-out prompt (slime's flag): eval_accuracy is their mean (avg@k), eval_pass_at_k the best of them"
    eval_temperature: float = 0.0
    "held-out sampling temperature (0: greedy, which needs --n-samples-per-eval-prompt 1)"
    save_interval: int = 20
    "checkpoint every N steps (0: only at the end)"
    seed: int = 0
    "seed of data order, sampling and init"
    device: str = "cpu"
    "cpu or cuda"
    cuda_graph: bool = False
    "rollout decode under CUDA graphs (CUDA only; the KV layout is then fixed at 512 positions a sample)"
    threads: int = 0
    "torch CPU threads (0: default)"
    placement: str = "local"
    "local (trainer and engine in this process) | ray (trainer and rollout engines as Ray actors)"
    rollout_num_engines: int = 1
    "--placement ray: rollout engines, one GPU each (on CPU, one CPU each); a batch is split across them"
    rollout_num_gpus_per_engine: int = 1
    "--placement ray: GPUs (actors) per engine, the model split over them by tensor parallelism (slime's flag)"
    colocate: bool = False
    "--placement ray: each trainer replica shares its GPU with one engine, whose KV cache is freed after every rollout (slime's flag)"
    rollout_expert_parallel: bool = False
    "with --rollout-num-gpus-per-engine N: MoE experts spread whole over the N GPUs (expert parallelism), not split N ways"
    ray_address: str = ""
    "--placement ray: the Ray cluster to join ('': $RAY_ADDRESS if set, else a new local Ray instance)"
    async_rollout: bool = False
    "--placement ray: the engines sample step t+1 while step t trains (one step off-policy; --is-mode tis corrects)"
    dp_size: int = 1
    "--placement ray: data-parallel trainer replicas, one GPU each (on CPU, --threads CPUs each), each training on its rows of every batch"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.rollout_num_engines < 1:
            raise ValueError(f"rollout_num_engines must be >= 1, got {self.rollout_num_engines}")
        if self.rollout_num_gpus_per_engine < 1:
            raise ValueError(f"rollout_num_gpus_per_engine must be >= 1, got {self.rollout_num_gpus_per_engine}")
        if self.placement == "local" and self.rollout_num_gpus_per_engine != 1:
            raise ValueError("--rollout-num-gpus-per-engine > 1 needs --placement ray")
        if self.colocate and (self.placement != "ray" or self.rollout_num_engines != self.dp_size
                              or self.rollout_num_gpus_per_engine != 1 or self.async_rollout):
            raise ValueError("--colocate pairs each trainer replica with one engine on its GPU: it needs --placement ray, "
                             "--rollout-num-engines equal to --dp-size, one GPU per engine and no --async-rollout")  # fmt: skip
        if self.rollout_expert_parallel and self.rollout_num_gpus_per_engine == 1:
            raise ValueError("--rollout-expert-parallel spreads experts over --rollout-num-gpus-per-engine > 1 GPUs")
        if self.placement == "local" and self.rollout_num_engines != 1:
            raise ValueError("--rollout-num-engines > 1 needs --placement ray")
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {self.dp_size}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if self.lr_warmup_steps < 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr_warmup_steps >= 0 and 0 <= min_lr <= lr, got {self.lr_warmup_steps}, "
                             f"{self.min_lr}, {self.lr}")  # fmt: skip
        if not 1 <= self.num_steps_per_rollout <= self.prompts_per_step * self.n_samples_per_prompt // self.dp_size:
            raise ValueError(f"num_steps_per_rollout={self.num_steps_per_rollout} must be in [1, the sequences a step "
                             "gives each trainer replica]")  # fmt: skip
        if self.num_steps_per_rollout > 1 and self.dynamic_sampling and self.dp_size > 1:
            # replicas would cut batches of different sizes into different numbers of steps
            raise ValueError("--num-steps-per-rollout > 1 with --dynamic-sampling needs --dp-size 1")
        if self.n_samples_per_eval_prompt < 1 or (self.n_samples_per_eval_prompt > 1 and self.eval_temperature <= 0):
            raise ValueError("--n-samples-per-eval-prompt must be >= 1, and > 1 needs --eval-temperature > 0 "
                             "(greedy samples are all the same)")  # fmt: skip
        if not 0 <= self.overlong_buffer_len <= self.max_new_tokens:
            raise ValueError(f"overlong_buffer_len must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.overlong_buffer_len}")  # fmt: skip
        from quantrl.rl.grpo import ADVANTAGE_ESTIMATORS

        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator must be one of {sorted(ADVANTAGE_ESTIMATORS)}, "
                             f"got {self.advantage_estimator!r}")  # fmt: skip
        if self.max_sampling_rounds < 1:
            raise ValueError(f"max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")
        if self.placement == "local" and self.dp_size != 1:
            raise ValueError("--dp-size > 1 needs --placement ray")
        if self.use_distributed_optimizer and self.dp_size == 1:
            raise ValueError("--use-distributed-optimizer shards the optimizer over --dp-size replicas; with one there "
                             "is nothing to shard (--optimizer-cpu-offload moves it off the GPU)")  # fmt: skip
        if self.dp_size > self.prompts_per_step * self.n_samples_per_prompt:
            raise ValueError(f"--dp-size {self.dp_size} exceeds the {self.prompts_per_step * self.n_samples_per_prompt} "
                             "sequences of a step: every replica needs rows")  # fmt: skip
        n = self.update_weights_interval
        if n < 1 or (n > 1 and (self.async_rollout or self.eval_interval % n or self.save_interval % n)):
            raise ValueError(f"--update-weights-interval {n} must be >= 1; above 1 it needs --eval-interval and "
                             "--save-interval multiples of it (evaluations and checkpoints meet synced engines) "
                             "and no --async-rollout")  # fmt: skip
        if self.custom_env_path and self.async_rollout:
            raise ValueError("--custom-env-path episodes wait on the environment every turn: no --async-rollout")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.placement == "local" and self.async_rollout:
            raise ValueError("--async-rollout needs --placement ray (the engines must run beside the trainer)")
        if self.is_config().active and self.use_rollout_logprobs:
            raise ValueError("--use-rollout-logprobs makes the engine's logprobs the old policy, leaving no train-"
                             "rollout ratio to correct: drop --is-mode / --rs-level / --rs-veto-threshold")  # fmt: skip
        from quantrl.rollout.kv_cache import KV_CACHE_DTYPES

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_fake_quant and self.kv_cache_dtype != "fp8_e4m3":
            raise ValueError("--kv-fake-quant rounds K and V as an FP8 KV cache does: it needs --kv-cache-dtype "
                             "fp8_e4m3")  # fmt: skip
        if self.eval_interval and not self.eval_size and not self.eval_data:
            raise ValueError(f"--eval-interval {self.eval_interval} needs held-out prompts: --eval-size > 0 or "
                             "--eval-data (or --eval-interval 0)")  # fmt: skip

    def is_config(self):
        """The train-rollout correction these flags describe (``rl.mismatch.ISConfig``)."""
        from quantrl.rl.mismatch import ISConfig

        return ISConfig(self.is_mode or None, self.is_cap, self.is_cap_low or None, self.is_level,
                        self.rs_level or None, self.rs_cap or None, self.rs_cap_low or None, self.rs_veto_threshold,
                        self.is_batch_normalize)  # fmt: skip


def lr_at(cfg: RLConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based; ``num_steps_per_rollout`` of them per rollout
    step, as Megatron's scheduler counts iterations): linear warm-up to ``lr``, then the decay style down to
    ``min_lr`` at the last. A function of the step alone, so a resumed run continues the same curve."""
    if step <= cfg.lr_warmup_steps:
        return cfg.lr * step / cfg.lr_warmup_steps
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    total = cfg.num_steps * cfg.num_steps_per_rollout
    frac = min(1.0, (step - cfg.lr_warmup_steps) / max(1, total - cfg.lr_warmup_steps))
    shape = 1 - frac if cfg.lr_decay_style == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def merge_step_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Several optimizer steps' ``train_step`` metrics as one: token sums (``*_sum``, ``loss_tokens``) and
    other counts added, the loss and grad norm averaged, the last lr."""
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        out[k] = vals[-1] if k == "lr" else sum(vals) / len(vals) if k in ("loss", "grad_norm") else sum(vals)
    return out


def default_model_dir() -> str:
    from quantrl.rl.pretrain import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(f"the embedded model is missing at {DEFAULT_MODEL_DIR}; run `quantrl pretrain` to rebuild it")
    return str(DEFAULT_MODEL_DIR)


def _engine_scheme(rollout: str, cfg: RLConfig):
    from quantrl.model import QuantScheme

    if rollout == "fp8":
        return QuantScheme.fp8_block()
    if rollout == "mxfp8":
        return QuantScheme.mxfp8()
    if rollout == "int4":
        return QuantScheme.int4(cfg.group_size)
    if rollout == "nvfp4":
        return QuantScheme.nvfp4()
    return QuantScheme()


def _task(cfg: RLConfig, tok):
    """(train PromptDataset, held-out prompts, reward(response_text, prompt) -> float)."""
    from quantrl.rl.data import DataConfig, PromptDataset, load_data
    from quantrl.rl.evaluate import embedded_split, reward_function

    reward = reward_function(cfg.custom_rm_path)
    if cfg.prompt_data:
        dcfg = DataConfig(prompt_data=cfg.prompt_data, input_key=cfg.input_key, label_key=cfg.label_key,
                          apply_chat_template=cfg.apply_chat_template, seed=cfg.seed, eval_data=cfg.eval_data or None,
                          metadata_keys=tuple(k for k in cfg.metadata_keys.split(",") if k),
                          eval_size=0 if cfg.eval_data or not cfg.eval_interval else cfg.eval_size)  # fmt: skip
        ds, held = load_data(dcfg, tok)
        return ds, held, reward
    train, held = embedded_split(cfg.num_prompts, cfg.eval_size, cfg.seed, cfg.difficulty)
    return PromptDataset(train, seed=cfg.seed), held, reward


def _batch(prompt_ids: list[list[int]], results, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response tensors; rollout logprobs placed at the positions predicting them, and
    (when the engine returned them) its MoE expert choices at the positions they were made for."""
    seqs = [prompt_ids[r.prompt_index] + r.tokens for r in results]
    t = max(len(s) for s in seqs)
    b = len(seqs)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    am = torch.zeros(b, t, dtype=torch.long)
    lm = torch.zeros(b, t, dtype=torch.long)
    rollout_logp = torch.zeros(b, t - 1)
    for i, (s, r) in enumerate(zip(seqs, results)):
        p = len(prompt_ids[r.prompt_index])
        ids[i, : len(s)] = torch.tensor(s)
        am[i, : len(s)] = 1
        mask = getattr(r, "loss_mask", None)  # multi-turn episodes: observation tokens carry no loss
        lm[i, p : len(s)] = 1 if mask is None else torch.tensor(mask)
        rollout_logp[i, p - 1 : len(s) - 1] = torch.tensor(r.logprobs)  # [B, T-1]: index j predicts token j+1
    batch = {"input_ids": ids, "attention_mask": am, "loss_mask": lm, "rollout_logp": rollout_logp}
    if results and results[0].routing is not None:
        from quantrl.model.moe import FREE

        routing = torch.full((b, t, *results[0].routing.shape[1:]), FREE, dtype=torch.int16)  # [B, T, L_moe, k]
        for i, r in enumerate(results):
            routing[i, : len(r.routing)] = r.routing  # the last token and the padding route freely
        batch["routing"] = routing
    return batch


class RLRun:
    """Everything one run holds; ``step()`` does one RL step, ``run()`` the whole loop.

    With ``--placement ray`` and ``world`` given, this is trainer replica ``rank`` of ``world.trainers``.
    Rank 0 leads: it owns the run directory, the engines, the data, the rewards and the metrics; its
    ``prepare_batch`` cuts each step's batch into one share of rows per replica, which the driver hands
    out. Each replica computes logprobs and gradients for its rows, and the gradients are summed over the
    replicas (``Trainer(dp_group=...)``), so all take the same step.
    """

    def __init__(self, cfg: RLConfig, progress: bool = True, world=None, rank: int = 0, placement_group=None):
        from transformers import AutoTokenizer

        from quantrl.model import build_model, load_model
        from quantrl.rl.grpo import RATIO_LEVEL_OF_ESTIMATOR, GRPOConfig, make_loss_fn
        from quantrl.rollout import Engine
        from quantrl.train.trainer import TrainConfig, Trainer

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.progress = cfg, progress
        self.recipe = get_recipe(cfg.recipe)
        if cfg.cuda_graph and torch.device(cfg.device).type != "cuda":
            raise ValueError(f"--cuda-graph needs --device cuda, got {cfg.device!r}")
        self.rank, self.lead = rank, rank == 0
        self.dp = world.trainers if world is not None else 1
        self.dp_group = None
        self.run_dir = RunDir(cfg.run_dir)
        if self.lead:
            self.run_dir.prepare(asdict(cfg), cfg.resume)
        resume_from = self.run_dir.latest_checkpoint() if cfg.resume else None
        self.model_dir = Path(cfg.model or default_model_dir())
        weights_dir = resume_from or self.model_dir
        self.tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        torch.manual_seed(cfg.seed)
        # the trainer: bf16 parameters (fp32 masters in the optimizer), the recipe's training mode
        model = load_model(weights_dir, dtype=torch.bfloat16, device=cfg.device).train()
        if cfg.use_rollout_routing_replay and model.num_moe_layers == 0:
            raise ValueError(f"--use-rollout-routing-replay needs a MoE model; {weights_dir} has no MoE layers")
        self.hf_config = json.loads((self.model_dir / "config.json").read_text())
        # the engines (and, with replicas, the world) come first: the trainer needs the data-parallel group
        scheme = _engine_scheme(self.recipe.rollout, cfg)
        max_len = 512
        batch = cfg.prompts_per_step * cfg.n_samples_per_prompt
        if cfg.placement == "ray":  # each engine samples about 1/E of the batch
            batch = -(-cfg.prompts_per_step // cfg.rollout_num_engines) * cfg.n_samples_per_prompt
        engine_kw = {"kv_cache_tokens": batch * max_len, "max_batch_size": batch, "use_cuda_graph": cfg.cuda_graph,
                     "max_seq_len": max_len if cfg.cuda_graph else None,
                     "kv_cache_dtype": cfg.kv_cache_dtype}  # fmt: skip
        # the engines' models are built, not loaded: they take the checkpoint's FP8 KV-cache scales from here
        kv_scales = {n: float(t) for n, t in model.kv_scale_tensors().items()}
        model.set_kv_fake_quant(cfg.kv_fake_quant)
        self.remote = cfg.placement == "ray"
        self.engine = None
        if self.remote and not self.lead:
            from quantrl.sync.ray_engines import join_world

            self.dp_group, _, _ = join_world(world, rank)
        elif self.remote:  # this process is the trainer actor; the engines are actors of their own
            from quantrl.sync.ray_engines import EngineSpec, RayEngines

            spec = EngineSpec(self.hf_config, scheme, torch.bfloat16, cfg.device, tp=cfg.rollout_num_gpus_per_engine,
                              expert_parallel=cfg.rollout_expert_parallel, free_kv_after_generate=cfg.colocate,
                              kv_scales=kv_scales, **engine_kw)  # fmt: skip
            self.engine = RayEngines(spec, cfg.rollout_num_engines, world=world, placement_group=placement_group)
            self.dp_group = self.engine.dp_group
            self.sync_target = self.engine.target(qmax=cfg.qmax)  # PTQ too uses --qmax
        else:
            from quantrl.sync.convert import SyncTarget

            engine_model = build_model(self.hf_config, scheme, dtype=torch.bfloat16, device=cfg.device)
            engine_model.set_kv_scales(kv_scales)
            self.engine = Engine(engine_model, **engine_kw)
            self.sync_target = SyncTarget.for_engine(self.engine, qmax=cfg.qmax)
        self.trainer = Trainer(model, TrainConfig(
            mode=self.recipe.train_mode, lr=cfg.lr, micro_batch_size=cfg.micro_batch_size, grad_clip=cfg.grad_clip,
            qat_group_size=cfg.group_size, qat_qmax=cfg.qmax, fp8_param_gather=cfg.fp8_param_gather,
            optimizer_cpu_offload=cfg.optimizer_cpu_offload, distributed_optimizer=cfg.use_distributed_optimizer),
            dp_group=self.dp_group)  # fmt: skip
        self.ref = None
        if cfg.kl_coef > 0:  # the initial policy, in the trainer's mode (QAT's fake quant, FP8 GEMMs)
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
            if resume_from is not None:  # `model` holds the checkpoint's weights; the reference must not move
                init = dict(load_model(self.model_dir, dtype=torch.bfloat16, device=cfg.device).named_parameters())
                with torch.no_grad():
                    for name, p in self.ref.named_parameters():
                        p.copy_(init[name])
        self.is_cfg = cfg.is_config()
        ratio_level = RATIO_LEVEL_OF_ESTIMATOR.get(cfg.advantage_estimator, "token")
        self.loss_fn = make_loss_fn(GRPOConfig(clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                               ratio_level=ratio_level, kl_coef=cfg.kl_coef,
                                               entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
                                               pack=cfg.pack_sequences))  # fmt: skip
        self.dataset, self.held_out, self.reward = _task(cfg, self.tok)
        from quantrl.rl.multiturn import load_env_fn

        self.env = load_env_fn(cfg.custom_env_path) if cfg.custom_env_path else None  # multi-turn episodes
        self.step_idx = 0
        self.pending: dict | None = None  # async rollout: the next step's samples, submitted or collected
        if resume_from is not None:
            state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
            optimizer = state["optimizer"]
            if "shards" in optimizer:  # a distributed optimizer's: each replica takes its parameters from the whole
                from quantrl.train.optimizer import merge_state_dicts

                optimizer = merge_state_dicts(torch.load(resume_from / f, mmap=True, weights_only=True)
                                              for f in optimizer["shards"])  # fmt: skip
            self.trainer.optimizer.load_state_dict(optimizer)
            self.dataset.load_state_dict(state["dataset"])
            self.step_idx = state["step"]
            # samples in flight at the checkpoint belong to an async run; a synchronous resume samples afresh
            self.pending = state.get("pending_rollout") if cfg.async_rollout else None
            self.trainer.step_count = state["step"]
            if self.lead:
                self.run_dir.truncate_metrics(self.step_idx)
        if self.lead:
            self._sync(self.step_idx)

    # ---- pieces -----------------------------------------------------------------------------------
    def _sync(self, version: int) -> dict:
        from quantrl.sync.in_process import sync_weights

        # the int4-qat-bf16-rollout ablation mismatches on purpose: QAT forward, BF16 master weights sampled
        kw = {"target": self.sync_target, "check_equal": self.cfg.check_weight_update_equal,
              "strict": self.cfg.recipe != "int4-qat-bf16-rollout"}  # fmt: skip
        if not self.remote:
            stats = sync_weights(self.trainer.model, self.engine, version, **kw)
            return {"sync_s": stats.seconds, "sync_GB_per_s": stats.gb_per_s}
        stats = self.engine.sync_weights(self.trainer.model, version, **kw)
        out = {"sync_s": stats.seconds, "sync_GB_per_s": stats.gb_per_s}
        if self.cfg.async_rollout:  # the sync first waits for the next step's samples: that wait is the rollout's
            out["sync_rollout_wait_s"] = self.engine.last_wait_s
        return out

    def _sample(self, prompts, params):
        return self._collect(self._submit(prompts, params))

    def _submit(self, prompts, params) -> dict:
        """Start a rollout (Ray engines work in the background; a local engine finishes it here)."""
        from quantrl.rl.data import encode_prompt

        ids = [encode_prompt(self.tok, p) for p in prompts]
        t0 = time.perf_counter()
        if self.env is not None:  # turn by turn, with the environment in between (never asynchronous)
            from quantrl.rl.multiturn import generate_episodes

            results = generate_episodes(self.engine, prompts, ids, params, self.env, self.tok, self.cfg.max_turns)
            return {"prompts": prompts, "ids": ids, "results": results, "rollout_s": time.perf_counter() - t0}
        if self.remote:
            return {"prompts": prompts, "ids": ids, "handle": self.engine.submit(ids, params)}
        results = self.engine.generate(ids, params)
        return {"prompts": prompts, "ids": ids, "results": results, "rollout_s": time.perf_counter() - t0}

    def _collect(self, rollout: dict):
        """(prompts, prompt ids, results sorted by (prompt, sample), engine seconds) of a submitted rollout."""
        if "results" not in rollout:
            rollout["results"], rollout["rollout_s"] = self.engine.collect(rollout.pop("handle"))
        results = sorted(rollout["results"], key=lambda r: (r.prompt_index, r.sample_index))  # GRPO groups
        return rollout["prompts"], rollout["ids"], results, rollout["rollout_s"]

    def _rollout_params(self, step: int, round_: int = 0):
        from quantrl.rollout import SamplingParams

        cfg = self.cfg
        return SamplingParams(n=cfg.n_samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, stop_token_ids=(self.tok.eos_token_id,),
                              seed=cfg.seed * 1_000_003 + step + round_ * 100_003,
                              return_routing=cfg.use_rollout_routing_replay)  # fmt: skip

    def evaluate(self, step: int = 0) -> dict[str, float]:
        """Held-out reward: ``eval_accuracy`` (the mean over every prompt's samples; greedy by default) and,
        with several samples a prompt, ``eval_pass_at_k`` (the mean over prompts of their best sample)."""
        from quantrl.rl.evaluate import eval_figures, eval_seed
        from quantrl.rollout import SamplingParams

        cfg, k = self.cfg, self.cfg.n_samples_per_eval_prompt
        params = SamplingParams(n=k, temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                                stop_token_ids=(self.tok.eos_token_id,), seed=eval_seed(cfg.seed, step))  # fmt: skip
        _, _, results, _ = self._sample(self.held_out, params)
        texts = [self.tok.decode(r.tokens, skip_special_tokens=True) for r in results]
        rewards = torch.tensor([self.reward(t, self.held_out[r.prompt_index]) for t, r in zip(texts, results)])
        return eval_figures(rewards, k)

    def _logprobs(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T-1] logprobs of the batch's tokens under ``model``, micro-batch by micro-batch (no grad), and
        with routing replay [flips, decisions]: how many replayed expert choices ``model`` would not make."""
        from quantrl.model.moe import Routing
        from quantrl.train.logprobs import token_logprobs

        mb, t = self.cfg.micro_batch_size, self.cfg.temperature
        ids, am, replay = batch["input_ids"], batch["attention_mask"], batch.get("routing")
        parts, counts = [], torch.zeros(2, dtype=torch.long)
        for i in range(0, ids.shape[0], mb):
            routing = None if replay is None else Routing(replay=replay[i : i + mb].long())
            parts.append(token_logprobs(model, ids[i : i + mb], am[i : i + mb], temperature=t, routing=routing,
                                        pack=self.cfg.pack_sequences)[0])  # fmt: skip
            if routing is not None:
                counts += torch.tensor([int(routing.flips), int(routing.decisions)])
        return torch.cat(parts), counts

    def _groups(self, rollout: dict) -> tuple[list[tuple], float]:
        """A collected rollout as (prompt, prompt ids, its n results, their rewards [n]) per prompt, and the
        engine seconds. Rewards include the soft overlong penalty (--overlong-buffer-len)."""
        from quantrl.rl.rewards import overlong_penalty

        cfg = self.cfg
        prompts, prompt_ids, results, rollout_s = self._collect(rollout)
        n = cfg.n_samples_per_prompt
        texts = [self.tok.decode(r.tokens, skip_special_tokens=True) for r in results]
        rewards = torch.tensor([self.reward(t, prompts[r.prompt_index])
                                + overlong_penalty(len(r.tokens), cfg.max_new_tokens, cfg.overlong_buffer_len,
                                                   cfg.overlong_penalty_factor)
                                for t, r in zip(texts, results)])  # fmt: skip
        groups = [(p, ids, results[i * n : (i + 1) * n], rewards[i * n : (i + 1) * n])
                  for i, (p, ids) in enumerate(zip(prompts, prompt_ids))]  # fmt: skip
        return groups, rollout_s

    def _rollout_batch(self, step: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Lead only: the step's samples (or the wait for them), rewards, advantages, as one batch [B, T].
        With --dynamic-sampling, more rounds of fresh prompts until enough groups have a reward spread."""
        from quantrl.rl.grpo import ADVANTAGE_ESTIMATORS, group_advantages, informative_groups

        cfg = self.cfg
        rollout = self.pending or self._submit(self.dataset.next_batch(cfg.prompts_per_step), self._rollout_params(step))
        self.pending = None
        t_wait = time.perf_counter()
        groups, rollout_s = self._groups(rollout)
        wait_s = time.perf_counter() - t_wait
        sampled, rounds = list(groups), 1
        if cfg.dynamic_sampling:
            def signal(gs: list[tuple]) -> list[tuple]:
                spread = informative_groups(torch.cat([g[3] for g in gs]), cfg.n_samples_per_prompt).tolist()
                return [g for g, keep in zip(gs, spread) if keep]

            kept = signal(groups)
            while len(kept) < cfg.prompts_per_step and rounds < cfg.max_sampling_rounds:
                more, s = self._groups(self._submit(self.dataset.next_batch(cfg.prompts_per_step),
                                                    self._rollout_params(step, rounds)))  # fmt: skip
                sampled, kept, rollout_s, rounds = sampled + more, kept + signal(more), rollout_s + s, rounds + 1
            # with no group (or too few rows for the replicas) kept, the first round trains as without the filter
            groups = kept[: cfg.prompts_per_step] if len(kept) * cfg.n_samples_per_prompt >= self.dp else groups
            kept_groups = len(kept)
        # the engines sample step + 1 while this step trains; after the last step too, so that the final
        # checkpoint holds those samples and a resume with a larger --num-steps stays one step off-policy
        if cfg.async_rollout:
            self.pending = self._submit(self.dataset.next_batch(cfg.prompts_per_step), self._rollout_params(step + 1))
        results = [replace(r, prompt_index=i) for i, g in enumerate(groups) for r in g[2]]
        batch = _batch([g[1] for g in groups], results, self.tok.pad_token_id)
        if cfg.use_rollout_routing_replay and "routing" not in batch:  # e.g. samples saved by a run without it
            raise ValueError(f"step {step}: --use-rollout-routing-replay, but these samples carry no routing")
        batch["advantages"] = group_advantages(torch.cat([g[3] for g in groups]), cfg.n_samples_per_prompt,
                                               **ADVANTAGE_ESTIMATORS[cfg.advantage_estimator])  # fmt: skip
        cut = torch.tensor([r.finish_reason == "length" for r in results])
        if cfg.overlong_filter and not cut.all():  # all cut: keep them rather than train on nothing
            batch["loss_mask"][cut] = 0
        info = {"sampled": [r for g in sampled for r in g[2]],
                "rewards": torch.cat([g[3] for g in sampled]), "rollout_s": rollout_s, "wait_s": wait_s}  # fmt: skip
        if cfg.dynamic_sampling:
            info["dynamic"] = {"sampling_rounds": rounds, "informative_prompt_frac": kept_groups / len(sampled),
                               "trained_prompts": len(groups)}  # fmt: skip
        return batch, info

    def prepare_batch(self) -> tuple[dict[str, torch.Tensor], ...]:
        """Lead, with replicas: sample and score the next step; returns every replica's rows of the batch,
        in rank order, which the driver hands out (``advance(rows)``), so no replica sits in a collective
        while the lead samples, and none receives more than its rows."""
        from quantrl.sync.ray_engines import shares

        self._prepared = self._rollout_batch(self.step_idx + 1)
        batch = self._prepared[0]
        return tuple({k: v[a:b] for k, v in batch.items()} for a, b in shares(batch["input_ids"].shape[0], self.dp))

    def _gather_rows(self, t: torch.Tensor) -> torch.Tensor | None:
        """Every replica's rows of ``t`` in rank order (the whole batch's) on the lead; None elsewhere."""
        if self.dp == 1:
            return t
        import torch.distributed as dist

        parts = [None] * self.dp if self.lead else None
        dist.gather_object(t.cpu(), parts, dst=0, group=self.dp_group)
        return torch.cat(parts).to(t.device) if self.lead else None

    def _check_replicas_equal(self) -> None:
        """--check-weight-update-equal with replicas: every replica must hold bit-identical parameters."""
        import hashlib

        import torch.distributed as dist

        h = hashlib.sha256()
        for _, p in self.trainer.model.named_parameters():
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = [None] * self.dp
        dist.all_gather_object(digests, h.hexdigest(), group=self.dp_group)
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel replicas diverged after step {self.step_idx}: parameter digests {digests}")

    def step(self, rows: dict[str, torch.Tensor] | None = None) -> dict:
        """One RL step. With replicas, ``rows`` are this replica's rows of the lead's ``prepare_batch``."""
        from quantrl.rl.grpo import reduce_metrics
        from quantrl.rl.mismatch import importance_weights, mismatch_metrics

        cfg, step = self.cfg, self.step_idx + 1
        t_step = time.perf_counter()
        if self.dp == 1:
            batch, info = self._rollout_batch(step)
            rows = batch
        elif rows is None:
            raise ValueError("with data-parallel replicas every step needs its rows of the lead's prepare_batch()")
        else:
            batch, info = self._prepared if self.lead else (None, None)
        mine = {k: v.to(cfg.device) for k, v in rows.items()}
        if self.dp == 1:
            batch = mine  # the same tensors: move them to the device once
        elif self.lead:  # the whole batch only for the metrics: not its token ids or routing
            batch = {k: batch[k].to(cfg.device) for k in ("rollout_logp", "loss_mask", "attention_mask")}
        with torch.no_grad():
            self.trainer.model.eval()
            own_logp, flips = self._logprobs(self.trainer.model, mine)
            train_logp, flips = self._gather_rows(own_logp), self._gather_rows(flips[None])
            if self.ref is not None:
                mine["ref_logp"] = self._logprobs(self.ref, mine)[0]
        correction = {}
        if self.is_cfg.active:  # once per step, over every replica's rows, before the batch is cut up
            mine["is_weight"], correction = importance_weights(own_logp, mine["rollout_logp"], mine["loss_mask"][:, 1:],
                                                               self.is_cfg, reduce=self.trainer.dp_sum)  # fmt: skip
        t0 = time.perf_counter()
        first_opt_step = (step - 1) * cfg.num_steps_per_rollout + 1
        if cfg.use_rollout_logprobs:  # the sampler is the old policy: the ratio carries the mismatch into the clip
            mine["old_logp"] = mine["rollout_logp"]
        if cfg.num_steps_per_rollout == 1:  # one step: the old policy is the training forward itself (or the sampler)
            self.trainer.optimizer.set_lr(lr_at(cfg, first_opt_step))
            train_metrics = reduce_metrics(self.trainer.train_step(mine, self.loss_fn))
        else:  # PPO's mini-batches: every step's ratio is taken against the policy that sampled-and-scored
            from quantrl.sync.ray_engines import shares

            mine.setdefault("old_logp", own_logp)
            parts = []
            for j, (a, b) in enumerate(shares(mine["input_ids"].shape[0], cfg.num_steps_per_rollout)):
                self.trainer.optimizer.set_lr(lr_at(cfg, first_opt_step + j))
                sub = {k: v[a:b] for k, v in mine.items()}
                # a mini-batch with no loss token (fewer --dynamic-sampling rows than steps, all of its samples
                # cut by --overlong-filter) is no step; every replica agrees on that, the count being summed
                if self.trainer.dp_sum([float(sub["loss_mask"].sum())])[0] > 0:
                    parts.append(self.trainer.train_step(sub, self.loss_fn))
            train_metrics = reduce_metrics(merge_step_metrics(parts))
        train_s = time.perf_counter() - t0
        self.step_idx = step
        if cfg.check_weight_update_equal and self.dp > 1:
            self._check_replicas_equal()
        if not self.lead:
            return {"step": step}
        mismatch = mismatch_metrics(train_logp, batch["rollout_logp"], batch["loss_mask"][:, 1:])
        synced = step % cfg.update_weights_interval == 0 or step == cfg.num_steps
        sync = self._sync(step) if synced else {}
        sampled, rollout_s = info["sampled"], info["rollout_s"]
        gen_tokens = sum(len(r.tokens) for r in sampled)  # every sample of the step, trained on or not
        row = {
            "step": step,
            "reward": float(info["rewards"].mean()),
            **mismatch,
            **correction,
            **{k: v for k, v in train_metrics.items()},
            **info.get("dynamic", {}),
            "response_len": gen_tokens / len(sampled),
            "truncated_frac": sum(r.finish_reason == "length" for r in sampled) / len(sampled),
            **({"turns": sum(r.turns for r in sampled) / len(sampled)} if self.env is not None else {}),
            "rollout_tokens_per_s": gen_tokens / rollout_s,
            "train_tokens_per_s": float(batch["attention_mask"].sum()) / train_s,
            "rollout_s": rollout_s,
            "train_s": train_s,
            **sync,
            "weight_version": self.engine.weight_version,
            "rollout_weight_version": min(r.weight_version for r in sampled),
        }
        if cfg.async_rollout:
            row["rollout_wait_s"] = info["wait_s"]
        if "routing" in mine:  # (token, MoE layer) choices where the trainer's router disagrees with the engine's
            flips, decisions = flips.sum(0).tolist()
            row["routing_flip_frac"] = flips / max(decisions, 1)
        row["step_s"] = time.perf_counter() - t_step  # rollout (or the wait for it) + train + sync
        if torch.cuda.is_available() and torch.device(cfg.device).type == "cuda":
            row["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
        else:
            import resource

            row["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        if cfg.eval_interval and step % cfg.eval_interval == 0:
            row.update(self.evaluate(step))
        return row

    def save(self) -> Path:
        """BF16 HF checkpoint + trainer state; ``latest`` moves only once both are on disk. With the
        distributed optimizer every replica writes its shard of the optimizer state (``optimizer.{rank}.pt``)
        into the checkpoint the lead has made; elsewhere the lead alone saves."""
        import os

        import torch.distributed as dist

        target = self.run_dir.checkpoint_dir(self.step_idx)
        sharded = self.trainer.sharded
        if not self.lead and not sharded:
            return target
        if self.lead:
            self.trainer.save_checkpoint(target, self.model_dir, overwrite=True)
        if sharded:
            dist.barrier(group=self.dp_group)  # the lead's checkpoint directory is in place
            shard = target / f"optimizer.{self.rank}.pt"
            torch.save(self.trainer.optimizer.state_dict(), shard.with_suffix(".pt.tmp"))
            os.replace(shard.with_suffix(".pt.tmp"), shard)
            dist.barrier(group=self.dp_group)  # every shard is on disk
            if not self.lead:
                return target
        tmp = target / "trainer_state.pt.tmp"
        if self.pending is not None:  # async: keep the next step's samples, so a resumed run uses the same ones
            self._collect(self.pending)
        optimizer = {"shards": [f"optimizer.{r}.pt" for r in range(self.dp)]} if sharded else self.trainer.optimizer.state_dict()
        torch.save({"optimizer": optimizer, "dataset": self.dataset.state_dict(), "step": self.step_idx,
                    "pending_rollout": self.pending}, tmp)  # fmt: skip
        os.replace(tmp, target / "trainer_state.pt")
        self.run_dir.mark_latest(target)
        return target

    def current_step(self) -> int:
        return self.step_idx

    def start(self) -> list[dict]:
        """The step-0 held-out accuracy of a fresh run (logged), or nothing."""
        if self.step_idx > 0 or not self.cfg.eval_interval or not self.lead:
            return []
        row0 = {"step": 0, **self.evaluate(0)}
        self.run_dir.append_metrics(row0)
        return [row0]

    def advance(self, rows: dict[str, torch.Tensor] | None = None) -> dict:
        """One step, logged, and a checkpoint when one is due."""
        row = self.step(rows)
        if self.lead:
            self.run_dir.append_metrics(row)
        cfg = self.cfg
        if (cfg.save_interval and self.step_idx % cfg.save_interval == 0) or self.step_idx == cfg.num_steps:
            self.save()  # the lead's (replicas hold the same weights), with each replica's optimizer shard
        return row

    def close(self) -> None:
        """Stop the Ray engines and leave the run's torch.distributed world (nothing to do when local)."""
        if not self.remote:
            return
        if self.engine is not None:
            self.engine.close()
        else:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def run(self) -> list[dict]:
        return drive(lambda method: getattr(self, method)(), self.cfg, self.progress)


def drive(call, cfg: RLConfig, progress: bool) -> list[dict]:
    """The loop over an ``RLRun``, local or a Ray actor: ``call(method_name)`` runs one of its methods."""
    rows = call("start")
    step = call("current_step")
    bar = tqdm(total=cfg.num_steps, initial=step, desc=f"rl {cfg.recipe}", disable=not progress)
    while step < cfg.num_steps:
        row = call("advance")
        rows.append(row)
        step = row["step"]
        bar.update(1)
        recent = [r["reward"] for r in rows[-10:] if "reward" in r]  # one step's reward is mostly its prompts
        shown = {"reward": f"{row['reward']:.3f}", "reward(10)": f"{sum(recent) / len(recent):.3f}",
                 "|dlogp|": f"{row['mismatch_abs_mean']:.4f}"}  # fmt: skip
        if "entropy" in row:
            shown["H"] = f"{row['entropy']:.3f}"
        if "eval_accuracy" in row:
            shown["eval"] = f"{row['eval_accuracy']:.3f}"
        bar.set_postfix(shown)
    bar.close()
    return rows


def train(cfg: RLConfig, progress: bool = True) -> list[dict]:
    if cfg.placement == "ray":
        return train_on_ray(cfg, progress)
    run = RLRun(cfg, progress)
    try:
        return run.run()
    finally:
        run.close()


def train_on_ray(cfg: RLConfig, progress: bool = True) -> list[dict]:
    """The trainer replicas as Ray actors (one GPU, or ``threads`` CPUs, each); replica 0 owns the run
    directory and the engine actors. A ``Rendezvous`` actor hosts the world's store; this process drives
    the loop and shows progress. Joins ``cfg.ray_address`` (or ``$RAY_ADDRESS``), or starts a local Ray instance and
    stops it at the end."""
    import dataclasses
    import os
    import warnings

    from quantrl.sync.ray_engines import Rendezvous, check_resources, import_ray

    ray = import_ray()
    # the actors may not share this process's working directory: hand them absolute paths
    paths = {k: getattr(cfg, k) for k in ("model", "prompt_data", "eval_data") if getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()),
                              **{k: str(Path(v).resolve()) for k, v in paths.items()})  # fmt: skip
    if ".py:" in cfg.custom_rm_path:  # a reward file, by absolute path too
        file, fn = cfg.custom_rm_path.rsplit(":", 1)
        cfg = dataclasses.replace(cfg, custom_rm_path=f"{Path(file).resolve()}:{fn}")
    RunDir(cfg.run_dir).check_usable(cfg.resume)  # before any actor starts (the lead checks again)
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda:  # an actor sees only the GPU Ray gave it, as cuda:0
        cfg = dataclasses.replace(cfg, device="cuda")
    threads = cfg.threads or 1
    trainers, engines, tp = cfg.dp_size, cfg.rollout_num_engines, cfg.rollout_num_gpus_per_engine
    gpus, cpus = (trainers + engines * tp if cuda else 0), trainers * threads + engines * tp
    if cfg.colocate:  # a trainer and an engine on each GPU
        gpus = trainers if cuda else 0
    started = not ray.is_initialized()
    if started:
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:  # a local instance: CPU actors may outnumber the cores (they are processes, not reservations)
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False)
    replicas, rendezvous, pg = [], None, None
    try:
        check_resources(ray, gpus=gpus, cpus=cpus,
                        what=f"--placement ray ({trainers} trainer replica(s) + {engines} engine(s) of {tp} GPU(s))")  # fmt: skip
        rendezvous = ray.remote(num_cpus=0)(Rendezvous).remote()  # hosts the world's store until we return
        world = ray.get(rendezvous.open.remote(trainers, engines, "nccl" if cuda else "gloo", tp))
        remote_run = ray.remote(num_gpus=(0.5 if cfg.colocate else 1) if cuda else 0, num_cpus=threads)(RLRun)
        run_cfg = dataclasses.replace(cfg, threads=threads)
        if cfg.colocate:  # bundle i: trainer replica i and engine i, one GPU between them
            from ray.util import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            pg = placement_group([{"CPU": threads + 1, **({"GPU": 1} if cuda else {})}] * trainers, strategy="PACK")
            ray.get(pg.ready())
            replicas = [remote_run.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, rank))
                        .remote(run_cfg, False, world, rank, pg) for rank in range(trainers)]  # fmt: skip
        else:
            replicas = [remote_run.remote(run_cfg, False, world, rank) for rank in range(trainers)]

        def call(method: str):  # every replica takes part in every step; the lead's answer is the run's
            if method == "advance" and trainers > 1:
                rows = replicas[0].prepare_batch.options(num_returns=trainers).remote()  # one ref per replica
                return ray.get([a.advance.remote(r) for a, r in zip(replicas, rows)])[0]
            return ray.get([getattr(a, method).remote() for a in replicas])[0]

        return drive(call, cfg, progress)
    finally:
        try:
            ray.get([a.close.remote() for a in replicas], timeout=120)
        except (ray.exceptions.RayError, TimeoutError) as e:  # killing the trainers frees their engines too
            warnings.warn(f"a trainer actor did not close cleanly ({type(e).__name__}); killing it", stacklevel=2)
        for a in [*replicas, rendezvous]:
            if a is not None:
                ray.kill(a)
        if pg is not None:
            from ray.util import remove_placement_group

            remove_placement_group(pg)
        if started:
            ray.shutdown()
