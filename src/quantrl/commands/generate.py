"""``quantrl generate``: sample from a checkpoint (BF16, FP8 or INT4) with quantrl's rollout engine.

Prints each sample's text, its finish reason and the mean logprob of its tokens (under the
temperature-scaled policy, as the engine returns it). Offline: the tokenizer comes from the model dir.
"""

from __future__ import annotations

import argparse

DTYPES = ("bfloat16", "float16", "float32")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample from a BF16 / FP8 / INT4 checkpoint with the rollout engine")
    p.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--n", type=int, default=1, help="samples")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="activation / high-precision weight dtype")
    p.add_argument("--cuda-graph", action="store_true", help="replay the decode step from CUDA graphs")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8_e4m3"), default="auto",
                   help="fp8_e4m3: an FP8 KV cache with the checkpoint's k_scale / v_scale (or 1.0), as SGLang's flag")
    p.set_defaults(func=_main)


def _generation_config_eos(model_dir: str) -> set[int]:
    """generation_config.json's eos ids: instruct models often name their end-of-turn token only there."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def _main(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from quantrl.checkpoint.safetensors_io import CheckpointError
    from quantrl.model import load_model
    from quantrl.rollout import Engine, SamplingParams

    try:
        model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)  # first: clear errors
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        if args.chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in newer transformers
        else:
            ids = tokenizer(args.prompt)["input_ids"]
        stop = set(model.config.eos_token_ids) | _generation_config_eos(args.model)
        if tokenizer.eos_token_id is not None:
            stop.add(tokenizer.eos_token_id)
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_new_tokens=args.max_new_tokens, stop_token_ids=tuple(sorted(stop)), seed=args.seed,
        )  # fmt: skip
        # KV cache for exactly this request: n sequences of prompt + max_new_tokens positions
        kv_tokens = args.n * (len(ids) + args.max_new_tokens)
        engine = Engine(model, kv_cache_tokens=kv_tokens, use_cuda_graph=args.cuda_graph,
                        kv_cache_dtype=args.kv_cache_dtype)
        results = engine.generate([ids], params)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}")
        return 2
    for r in results:
        mean = sum(r.logprobs) / len(r.logprobs)
        print(f"--- sample {r.sample_index} (finish: {r.finish_reason}, {len(r.tokens)} tokens, "
              f"mean logprob {mean:.4f})")  # fmt: skip
        completion = tokenizer.decode(r.tokens, skip_special_tokens=True)
        print(completion if args.chat else args.prompt + completion)
    return 0
