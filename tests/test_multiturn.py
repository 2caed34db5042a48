"""Multi-turn rollouts (``--custom-env-path``): policy turns keep the engine's tokens and logprobs in the
context they were sampled in (fp32: equal to a full forward of the final sequence), observations carry
no loss, episodes end for the documented reasons, and the RL loop trains on them."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from quantrl.model import load_model
from quantrl.rl.data import Prompt, encode_prompt
from quantrl.rl.loop import RLConfig, _batch, default_model_dir, train
from quantrl.rl.multiturn import generate_episodes, load_env_fn
from quantrl.rollout import Engine, SamplingParams
from quantrl.train.logprobs import token_logprobs

OBS = "\ncheck: ok\n"


def one_check(prompt, transcript):
    """One observation after the first turn, then the end."""
    return None if "check" in transcript else OBS


@pytest.fixture(scope="module")
def setup():
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = load_model(default_model_dir(), dtype=torch.float32)
    pairs = ((7, 8), (12, 3))
    prompts = [Prompt(text=f"what is {a}*{b}?\n", label=str(a * b), index=i) for i, (a, b) in enumerate(pairs)]
    return tok, model, prompts, [encode_prompt(tok, p) for p in prompts]


def test_episodes_keep_sampled_tokens_and_logprobs_in_context(setup):
    tok, model, prompts, ids = setup
    engine = Engine(model, kv_cache_tokens=4096)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=96, seed=0, stop_token_ids=(tok.eos_token_id,))
    eps = generate_episodes(engine, prompts, ids, params, one_check, tok, max_turns=3)
    obs_ids = tok(OBS, add_special_tokens=False)["input_ids"]
    assert [(e.prompt_index, e.sample_index) for e in eps] == [(p, s) for p in range(2) for s in range(3)]
    two_turns = [e for e in eps if e.turns == 2]
    assert two_turns, "no episode reached its second turn"
    for e in eps:
        assert len(e.tokens) == len(e.logprobs) == len(e.loss_mask) <= 96
        if e.turns == 2:
            first = e.loss_mask.index(0)  # the observation follows turn 1, whole
            assert e.tokens[first : first + len(obs_ids)] == obs_ids and e.tokens[first - 1] == tok.eos_token_id
            assert e.loss_mask == [1] * first + [0] * len(obs_ids) + [1] * (len(e.tokens) - first - len(obs_ids))
            assert e.finish_reason in ("stop", "length")
        # engine logprobs = one forward of the final sequence, at the policy's positions (fp32)
        full = torch.tensor([ids[e.prompt_index] + e.tokens])
        with torch.no_grad():
            lp = token_logprobs(model, full, torch.ones_like(full))[0][0, len(ids[e.prompt_index]) - 1 :]
        mask = torch.tensor(e.loss_mask, dtype=torch.bool)
        assert torch.allclose(torch.tensor(e.logprobs)[mask], lp[mask], atol=1e-5, rtol=0)
        assert (torch.tensor(e.logprobs)[~mask] == 0).all()
    batch = _batch(ids, eps, tok.pad_token_id)  # the loop's batch: the loss mask is the episodes'
    for i, e in enumerate(eps):
        p = len(ids[e.prompt_index])
        assert batch["loss_mask"][i, p : p + len(e.tokens)].tolist() == e.loss_mask
        assert batch["loss_mask"][i].sum() == sum(e.loss_mask)


def test_episode_ends(setup):
    tok, model, prompts, ids = setup
    engine = Engine(model, kv_cache_tokens=4096)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=96, seed=1, stop_token_ids=(tok.eos_token_id,))
    once = generate_episodes(engine, prompts, ids, params, one_check, tok, max_turns=1)
    assert all(e.turns == 1 and 0 not in e.loss_mask for e in once)
    assert {e.finish_reason for e in once} <= {"max_turns", "length"} and "max_turns" in {e.finish_reason for e in once}
    never = generate_episodes(engine, prompts, ids, params, lambda p, t: None, tok, max_turns=4)
    assert all(e.turns == 1 and e.finish_reason in ("stop", "length") for e in never)
    tight = generate_episodes(engine, prompts, ids, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=1,
                              stop_token_ids=(tok.eos_token_id,)), one_check, tok, max_turns=4)  # fmt: skip
    assert all(len(e.tokens) <= 8 for e in tight) and any(e.finish_reason == "length" for e in tight)
    with pytest.raises(TypeError, match="observation text or None"):
        bad = load_env_fn(__file__ + ":returns_a_number")
        generate_episodes(engine, prompts, ids, params, bad, tok, max_turns=2)
    with pytest.raises(ValueError, match="max_turns"):
        generate_episodes(engine, prompts, ids, params, one_check, tok, max_turns=0)


def returns_a_number(prompt, transcript):
    return 3


def test_the_loop_trains_on_episodes(tmp_path):
    rows = train(RLConfig(run_dir=str(tmp_path / "mt"), custom_env_path=f"{__file__}:one_check", max_turns=2,
                          num_steps=2, prompts_per_step=2, n_samples_per_prompt=4, max_new_tokens=64, eval_size=4,
                          eval_interval=2, save_interval=0, recipe="bf16"), progress=False)  # fmt: skip
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 2 and all(1 < r["turns"] <= 2 for r in steps)
    for r in steps:  # observation tokens are in the response but not in the loss
        assert r["loss_tokens"] < r["response_len"] * 8 and r["mismatch_abs_mean"] < 1e-2
    assert "eval_accuracy" in rows[-1]
    from quantrl.rl.evaluate import EvalConfig, evaluate  # quantrl eval runs the same episodes

    out = evaluate(EvalConfig(custom_env_path=f"{__file__}:one_check", max_turns=2, eval_size=4, max_new_tokens=64,
                              save_samples=str(tmp_path / "samples.jsonl")))  # fmt: skip
    first = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert out["prompts"] == 4 and "check: ok" in first["response"]
    with pytest.raises(ValueError, match="no --async-rollout"):
        RLConfig(custom_env_path="x.py:f", async_rollout=True, placement="ray")
