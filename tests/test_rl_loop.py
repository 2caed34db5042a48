"""The RL loop end to end on a tiny warm-started model: every recipe runs, resume repeats an
uninterrupted run exactly, a crash never corrupts the last checkpoint, plots render."""

import dataclasses
import functools
import json

import pytest
import torch

from quantrl.rl.loop import RLConfig, RLRun, train
from quantrl.rl.pretrain import PretrainConfig, pretrain
from quantrl.rl.recipes import RECIPES

TIMING = ("_s", "_per_s", "peak_", "sync_GB")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    pretrain(PretrainConfig(out_dir=str(out), hidden_size=128, num_layers=2, intermediate_size=256, steps=30,
                            batch_size=32, num_problems=2000, difficulty="easy"), progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_moe_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "m"
    pretrain(PretrainConfig(out_dir=str(out), hidden_size=128, num_layers=2, intermediate_size=256, steps=30,
                            batch_size=32, num_problems=2000, difficulty="easy", num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=128), progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tiny_deepseek_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepseek") / "m"
    pretrain(PretrainConfig(out_dir=str(out), arch="deepseek_v3", hidden_size=128, num_layers=2, intermediate_size=256,
                            steps=30, batch_size=32, num_problems=2000, difficulty="easy", num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=128), progress=False)  # fmt: skip
    return out


def cfg(model, run_dir, **kw):
    base = RLConfig(model=str(model) if model else "", run_dir=str(run_dir), num_steps=2, prompts_per_step=2, n_samples_per_prompt=3,
                    max_new_tokens=12, eval_size=4, eval_interval=2, save_interval=2, micro_batch_size=4,
                    difficulty="easy", lr=1e-4, check_weight_update_equal=True)
    return dataclasses.replace(base, **kw)


def trained_micro_batches(monkeypatch, key: str) -> list:
    """A list that collects ``micro[key]`` of every micro-batch the GRPO loss trains on."""
    from quantrl.rl import grpo

    seen, real = [], grpo.make_loss_fn

    def spy(*a, **k):
        fn = real(*a, **k)
        return lambda model, micro: seen.append(micro.get(key)) or fn(model, micro)

    monkeypatch.setattr(grpo, "make_loss_fn", spy)
    return seen


def untimed(rows):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_runs(recipe, tiny_model, tmp_path):
    rows = train(cfg(tiny_model, tmp_path / recipe, recipe=recipe, is_mode="tis"), progress=False)
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert 0 <= r["reward"] <= 1 and r["mismatch_abs_mean"] >= 0 and r["weight_version"] == r["step"]
        assert r["rollout_tokens_per_s"] > 0 and "is_clipped_frac" in r
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[-1]
    ckpt = tmp_path / recipe / "checkpoints" / "step_000002"
    assert (ckpt / "trainer_state.pt").exists() and (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "config.json").read_text()).get("quantization_config") is None  # BF16 only
    assert (tmp_path / recipe / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_bf16_recipe_has_the_smallest_mismatch(tiny_model, tmp_path):
    """BF16/BF16 only differs by batch shape; INT4 PTQ rollout of a non-QAT model differs by quantization."""
    bf16 = train(cfg(tiny_model, tmp_path / "a", recipe="bf16", num_steps=1, eval_interval=0), progress=False)
    ptq = train(cfg(tiny_model, tmp_path / "b", recipe="int4-ptq", num_steps=1, eval_interval=0), progress=False)
    assert bf16[-1]["mismatch_abs_mean"] < ptq[-1]["mismatch_abs_mean"]


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    """The embedded model, which solves some problems, so that gradients, optimizer states and the KL term
    are not zero; the resumed run's KL reference must be the initial policy, not the checkpoint's."""
    run = functools.partial(cfg, "", kl_coef=0.1, lr=1e-3, prompts_per_step=4, n_samples_per_prompt=4,
                            max_new_tokens=40, difficulty="medium", threads=1)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        full = train(run(tmp_path / "full", num_steps=4), progress=False)
        train(run(tmp_path / "cut", num_steps=2), progress=False)
        resumed_rows = train(run(tmp_path / "cut", num_steps=4, resume=True), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert all(r["grad_norm"] > 0 and r["kl_ref"] > 0 for r in full[2:] if "reward" in r), full
    assert [r["step"] for r in resumed_rows if "reward" in r] == [3, 4]
    on_disk = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert untimed(on_disk) == untimed(full)


def test_resume_before_the_first_checkpoint_starts_over(tiny_model, tmp_path):
    run = RLRun(cfg(tiny_model, tmp_path / "r", num_steps=3, save_interval=5), progress=False)
    run.start()
    run.advance()  # step 1 is logged, no checkpoint is written yet: then the process dies
    del run
    train(cfg(tiny_model, tmp_path / "r", num_steps=3, save_interval=5, resume=True), progress=False)
    on_disk = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == [0, 1, 2, 3]  # once each: not the dead run's rows before them


def test_crash_mid_step_keeps_the_last_checkpoint(tiny_model, tmp_path, monkeypatch):
    run = RLRun(cfg(tiny_model, tmp_path / "r", num_steps=4), progress=False)
    real_step = RLRun.step

    def dying_step(self, *args):
        if self.step_idx == 2:
            raise KeyboardInterrupt("simulated crash in step 3")
        return real_step(self, *args)

    monkeypatch.setattr(RLRun, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run.run()
    latest = (tmp_path / "r" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000002"
    monkeypatch.setattr(RLRun, "step", real_step)
    rows = train(cfg(tiny_model, tmp_path / "r", num_steps=3, resume=True), progress=False)
    assert [r["step"] for r in rows if "reward" in r] == [3]


def test_refuses_to_reuse_a_run_dir(tiny_model, tmp_path):
    train(cfg(tiny_model, tmp_path / "x", num_steps=1, eval_interval=0), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg(tiny_model, tmp_path / "x", num_steps=1), progress=False)


def test_plot_writes_the_figures(tiny_model, tmp_path):
    from quantrl.cli import main

    train(cfg(tiny_model, tmp_path / "a", recipe="bf16", num_steps=2), progress=False)
    train(cfg(tiny_model, tmp_path / "b", recipe="int4-qat", num_steps=2, is_mode="mis", rs_level="token"),
          progress=False)  # fmt: skip
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "plots")]) == 0
    for name in ("reward.png", "mismatch.png", "throughput.png", "entropy.png", "correction.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_labels_tell_runs_with_the_same_dir_name_apart(tmp_path):
    from quantrl.rl.plot import _labels

    runs = [tmp_path / "a" / "bf16", tmp_path / "b" / "bf16", tmp_path / "b" / "x"]
    for run, recipe in zip(runs, ("bf16", "bf16", "int4-qat")):
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"recipe": recipe}))
    assert list(_labels(runs).values()) == ["bf16 (a/bf16)", "bf16 (b/bf16)", "int4-qat (b/x)"]
    assert list(_labels(runs[1:]).values()) == ["bf16", "int4-qat (x)"]


def test_cli_resume_reuses_the_saved_config(tiny_model, tmp_path, capsys):
    from quantrl.cli import main

    run = tmp_path / "cli"
    args = ["train", "--model", str(tiny_model), "--run-dir", str(run), "--num-steps", "2", "--prompts-per-step", "2",
            "--n-samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-size", "4", "--eval-interval", "0",
            "--difficulty", "easy", "--recipe", "fp8", "--no-progress"]
    assert main(args) == 0
    assert main(["train", "--run-dir", str(run), "--resume", "--num-steps", "3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "fp8" in capsys.readouterr().out  # the saved recipe, not the default one


def test_slime_env_switches_pick_or_check_the_recipe(monkeypatch):
    from quantrl.rl.recipes import apply_slime_env

    monkeypatch.setenv("OPEN_TRAINING_INT4_FAKE_QAT_FLAG", "1")
    monkeypatch.setenv("OPEN_TRAINING_INT4_GROUP_SIZE", "32")
    cfg = apply_slime_env(RLConfig(), set())
    assert (cfg.recipe, cfg.group_size) == ("int4-qat", 32)
    with pytest.raises(ValueError, match="disagree"):
        apply_slime_env(RLConfig(group_size=64), {"group_size"})
    with pytest.raises(ValueError, match="does not train"):
        apply_slime_env(RLConfig(recipe="int4-ptq"), {"recipe"})
    monkeypatch.setenv("OPEN_TRAINING_INT4_FAKE_QAT_FLAG", "0")
    assert apply_slime_env(RLConfig(recipe="int4-ptq"), {"recipe"}).recipe == "int4-ptq"
    with pytest.raises(ValueError, match="the default recipe 'int4-qat' trains with it"):
        apply_slime_env(RLConfig(), set())
    monkeypatch.setenv("OPEN_TRAINING_INT4_FAKE_QAT_FLAG", "maybe")
    with pytest.raises(ValueError, match="expected 1 or 0"):
        apply_slime_env(RLConfig(), set())


def test_resume_flags_given_at_their_default_value_still_count(tmp_path):
    import argparse

    from quantrl.commands.train import register, resumed_config
    from quantrl.config_cli import flags_given, from_args

    saved = RLConfig(run_dir=str(tmp_path), is_mode="tis", num_steps=100, device="cpu", lr=3e-4)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--run-dir", str(tmp_path), "--resume", "--is-mode", "", "--num-steps", "40"])
    assert flags_given(args) == {"run_dir", "resume", "is_mode", "num_steps"}
    cfg = resumed_config(from_args(RLConfig, args), flags_given(args))
    assert (cfg.is_mode, cfg.num_steps, cfg.lr, cfg.resume) == ("", 40, 3e-4, True)  # 40 and '' are the defaults


def test_cuda_graph_needs_cuda(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph needs --device cuda"):
        train(cfg(tiny_model, tmp_path / "g", cuda_graph=True), progress=False)
    assert not (tmp_path / "g").exists()  # refused before the run directory is made


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("recipe", "cuda_graph"), [("bf16", False), ("fp8", True), ("int4-qat", True)])
def test_recipes_run_on_cuda(recipe, cuda_graph, tiny_model, tmp_path):
    """The whole loop on the GPU: kernels in trainer and engine, sync to CUDA buffers, graphs across updates."""
    rows = train(cfg(tiny_model, tmp_path / recipe, recipe=recipe, device="cuda", cuda_graph=cuda_graph,
                     num_steps=3), progress=False)  # fmt: skip
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["weight_version"] == r["step"] for r in steps)
    assert all(0 <= r["mismatch_abs_mean"] < 0.5 for r in steps), [r["mismatch_abs_mean"] for r in steps]


def test_ray_placement_repeats_the_local_run(tiny_model, tmp_path):
    """Trainer and one engine as Ray actors: the same metrics as the local run, number for number (one CPU
    thread each side, so that no reduction order differs); then two engines share the batch and resume."""
    pytest.importorskip("ray")
    threads = torch.get_num_threads()
    try:
        local = train(cfg(tiny_model, tmp_path / "local", threads=1), progress=False)
    finally:
        torch.set_num_threads(threads)
    on_ray = train(cfg(tiny_model, tmp_path / "ray", threads=1, placement="ray"), progress=False)
    assert untimed(on_ray) == untimed(local)
    two = cfg(tiny_model, tmp_path / "two", placement="ray", rollout_num_engines=2, num_steps=3, save_interval=1)
    train(dataclasses.replace(two, num_steps=2), progress=False)
    rows = train(dataclasses.replace(two, resume=True), progress=False)
    assert [r["step"] for r in rows] == [3] and rows[0]["weight_version"] == 3
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert [r["rollout_weight_version"] for r in local if "reward" in r] == [0, 1]  # on-policy


def test_async_rollout_is_one_step_off_policy_and_resumes_exactly(tiny_model, tmp_path):
    """--async-rollout: step t + 1's samples come from the weights before step t's update; the samples
    pending at a checkpoint are saved with it, so a run stopped after it repeats the uninterrupted one."""
    ray = pytest.importorskip("ray")
    run = functools.partial(cfg, tiny_model, placement="ray", async_rollout=True, is_mode="tis", eval_interval=0,
                            num_steps=4, threads=1)  # fmt: skip
    full = train(run(tmp_path / "full"), progress=False)
    assert [r["rollout_weight_version"] for r in full] == [0, 0, 1, 2]
    assert [r["weight_version"] for r in full] == [1, 2, 3, 4]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    threads = torch.get_num_threads()
    try:
        cut = RLRun(run(tmp_path / "cut"), progress=False)  # this process is the trainer, the engine an actor
        cut.advance()
        cut.advance()  # checkpoint at step 2, with step 3's samples in flight
        cut.close()  # the run stops here
        train(run(tmp_path / "cut", resume=True), progress=False)
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
    on_disk = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert untimed(on_disk) == untimed(full)
    # a finished run extended by --num-steps: its last checkpoint kept the next step's samples
    train(run(tmp_path / "ext", num_steps=3), progress=False)
    extended = train(run(tmp_path / "ext", resume=True), progress=False)
    assert untimed(extended) == untimed(full[3:])
    with pytest.raises(ValueError, match="needs --placement ray"):
        RLConfig(async_rollout=True)


def test_dynamic_sampling_trains_only_prompts_with_a_reward_spread(tiny_model, tmp_path, monkeypatch):
    """--dynamic-sampling: prompts whose samples all got the same reward are dropped and fresh prompts
    sampled, up to --max-sampling-rounds rounds; the trained batch holds only groups with a spread (all
    with nonzero advantages). A model that solves nothing never finds one: every round is spent, and the
    step trains on its first round as without the filter."""
    trained = trained_micro_batches(monkeypatch, "advantages")
    run = functools.partial(cfg, "", eval_interval=0, num_steps=2, prompts_per_step=4, n_samples_per_prompt=4,
                            max_new_tokens=48, difficulty="medium", micro_batch_size=64,
                            dynamic_sampling=True, max_sampling_rounds=3)  # fmt: skip
    rows = train(run(tmp_path / "dyn"), progress=False)
    for r, adv in zip(rows, trained):
        assert 1 <= r["sampling_rounds"] <= 3 and 1 <= r["trained_prompts"] <= 4
        assert adv.shape[0] == 4 * r["trained_prompts"] and (adv.view(-1, 4) != 0).any(1).all()
        if r["sampling_rounds"] < 3:  # it stopped early: enough prompts had a spread
            assert r["trained_prompts"] == 4 and r["informative_prompt_frac"] * 4 * r["sampling_rounds"] >= 4
    assert sum(r["sampling_rounds"] for r in rows) > 2  # the warm-started model solves some prompts every time
    trained.clear()
    rows = train(cfg(tiny_model, tmp_path / "none", eval_interval=0, dynamic_sampling=True, max_sampling_rounds=2,
                     micro_batch_size=64), progress=False)  # fmt: skip
    for r, adv in zip(rows, trained):
        assert (r["sampling_rounds"], r["informative_prompt_frac"], r["trained_prompts"]) == (2, 0.0, 2)
        assert adv.shape[0] == 2 * 3 and not adv.any()
    state = torch.load(tmp_path / "none" / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert state["dataset"]["cursor"] == 2 * 2 * 2  # every round drew fresh prompts (steps x rounds x prompts)
    with pytest.raises(ValueError, match="max_sampling_rounds"):
        RLConfig(max_sampling_rounds=0)


def test_several_optimizer_steps_per_rollout(tmp_path, monkeypatch):
    """--num-steps-per-rollout 3: each rollout batch is three optimizer steps on its thirds, each PPO ratio
    taken against the logprobs the trainer had before the first (old_logp): 1 on the first mini-batch
    (up to the eval/train forward's rounding), away from 1 once the policy has moved."""
    from quantrl.rl import grpo

    ratios = []
    real = grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **k: (out := real(*a, **k)) and ratios.append(
        out[1]["ratio_mean_sum"] / out[1]["loss_tokens"]) or out)  # fmt: skip
    # the embedded model: the tiny one solves nothing, so its advantages are zero and the policy never moves
    run = cfg("", tmp_path / "k", eval_interval=0, num_steps=2, num_steps_per_rollout=3, micro_batch_size=64,
              n_samples_per_prompt=4, prompts_per_step=4, max_new_tokens=48, difficulty="medium", lr=1e-3,
              lr_decay_style="linear")  # fmt: skip
    rl = RLRun(run, progress=False)
    rows = rl.run()
    assert [r["weight_version"] for r in rows] == [1, 2] and rl.trainer.step_count == 6
    assert len(ratios) == 6 and abs(ratios[0] - 1) < 1e-3 and any(abs(r - 1) > 1e-3 for r in ratios[1:])
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 0.0])  # linear decay over the 6 optimizer steps: 3 and 6
    assert all("pg_clipfrac" in r and r["loss_tokens"] > 0 for r in rows)
    with pytest.raises(ValueError, match="num_steps_per_rollout=7"):
        RLConfig(num_steps_per_rollout=7, prompts_per_step=2, n_samples_per_prompt=3)
    with pytest.raises(ValueError, match="needs --dp-size 1"):
        RLConfig(num_steps_per_rollout=2, dynamic_sampling=True, placement="ray", dp_size=2)


def test_sequence_level_correction_and_gspo_in_the_loop(tmp_path, monkeypatch):
    """Sequence-level TIS with rejection and batch normalization (INT4 PTQ rollout: a mismatch to correct):
    the loss gets one weight per sequence, mean 1 over the step's kept sequences, none on rejected ones.
    GSPO with two optimizer steps per rollout: the second step's sequence ratios leave GSPO's narrow clip."""
    weights = trained_micro_batches(monkeypatch, "is_weight")
    masks = trained_micro_batches(monkeypatch, "loss_mask")
    run = functools.partial(cfg, "", eval_interval=0, num_steps=2, micro_batch_size=64, n_samples_per_prompt=4,
                            prompts_per_step=4, max_new_tokens=48, difficulty="medium", recipe="int4-ptq")  # fmt: skip
    rows = train(run(tmp_path / "is", is_mode="tis", is_level="sequence", is_cap=1.05, is_batch_normalize=True,
                     rs_level="sequence", rs_cap=1.5, rs_veto_threshold=1e-4), progress=False)  # fmt: skip
    assert len(weights) == 2  # one micro-batch a step
    for w, lm, r in zip(weights, masks, rows):
        m = lm[:, 1:].bool()
        per_row = [w[i][m[i]] for i in range(len(w)) if m[i].any()]
        assert all(torch.equal(x, x[:1].expand_as(x)) for x in per_row)  # one weight per sequence
        kept = torch.stack([x[0] for x in per_row if x[0] > 0])
        assert float(kept.mean()) == pytest.approx(1.0, abs=1e-5)
        assert (w[~m] == 0).all() and 0 <= r["rs_rejected_frac"] < 1 and r["is_weight_mean"] > 0
        assert r["mismatch_seq_abs_mean"] >= r["mismatch_geo_abs_mean"] > 0
    assert any(r["is_clipped_frac"] > 0 for r in rows)  # sequence ratios beyond 1.05 were truncated

    gspo = train(run(tmp_path / "gspo", recipe="bf16", advantage_estimator="gspo", clip_eps=3e-4, clip_eps_high=4e-4,
                     num_steps_per_rollout=2, lr=3e-3), progress=False)  # fmt: skip
    assert all(r["loss_tokens"] > 0 for r in gspo) and any(r["pg_clipfrac"] > 0 for r in gspo)
    # --use-rollout-logprobs: the engine's logprobs are PPO's old policy, so the first ratio is the mismatch's
    (bypass,) = train(run(tmp_path / "bypass", num_steps=1, use_rollout_logprobs=True), progress=False)
    assert bypass["approx_kl"] != 0 and bypass["ratio_mean"] == pytest.approx(bypass["is_ratio_mean"], abs=2e-4)
    with pytest.raises(ValueError, match="use-rollout-logprobs"):
        RLConfig(use_rollout_logprobs=True, is_mode="tis")
    with pytest.raises(ValueError, match="needs an IS mode"):
        RLConfig(is_batch_normalize=True)
    with pytest.raises(ValueError, match="level"):
        RLConfig(is_mode="tis", is_level="batch")


def test_fp8_kv_cache_rollout_and_the_trainers_matching_rounding(tiny_model, tmp_path):
    """--kv-cache-dtype fp8_e4m3 adds the cache's rounding to the mismatch; --kv-fake-quant puts the same
    rounding into the trainer's attention and takes it out again (the first step: the same weights)."""
    run = functools.partial(cfg, tiny_model, recipe="bf16", eval_interval=0, num_steps=1)
    plain, kv8, both = (train(run(tmp_path / name, **kw), progress=False)[0] for name, kw in (
        ("plain", {}), ("kv8", {"kv_cache_dtype": "fp8_e4m3"}),
        ("both", {"kv_cache_dtype": "fp8_e4m3", "kv_fake_quant": True})))  # fmt: skip
    assert kv8["mismatch_abs_mean"] > 3 * plain["mismatch_abs_mean"], (kv8, plain)
    assert both["mismatch_abs_mean"] < kv8["mismatch_abs_mean"] / 3, (both, kv8)
    with pytest.raises(ValueError, match="needs --kv-cache-dtype fp8_e4m3"):
        RLConfig(kv_fake_quant=True)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        RLConfig(kv_cache_dtype="int4")


def test_weights_sync_every_other_step(tmp_path):
    """--update-weights-interval 2: the engine takes the weights at even steps (and the last), so odd steps
    sample from weights one update old; that lag shows in the mismatch, and resuming repeats the run."""
    run = functools.partial(cfg, "", recipe="bf16", num_steps=4, update_weights_interval=2, eval_interval=2,
                            save_interval=2, lr=1e-3, prompts_per_step=4, n_samples_per_prompt=4, max_new_tokens=48,
                            difficulty="medium")  # fmt: skip
    rows = [r for r in train(run(tmp_path / "full"), progress=False) if "reward" in r]
    assert [r["weight_version"] for r in rows] == [0, 2, 2, 4]
    assert [r["rollout_weight_version"] for r in rows] == [0, 0, 2, 2]
    assert ["sync_s" in r for r in rows] == [False, True, False, True]
    assert rows[1]["mismatch_abs_mean"] > 5 * rows[0]["mismatch_abs_mean"]  # step 2 samples pre-step-1 weights
    train(run(tmp_path / "half", num_steps=2), progress=False)
    resumed = [r for r in train(run(tmp_path / "half", resume=True), progress=False) if "reward" in r]
    assert untimed(resumed) == untimed(rows[2:])
    with pytest.raises(ValueError, match="multiples"):
        RLConfig(update_weights_interval=4, eval_interval=10)


def test_sampled_evaluation_reports_avg_and_pass_at_k(tmp_path):
    """--n-samples-per-eval-prompt 4 --eval-temperature 1: eval_accuracy is the mean over all samples
    (avg@4) and eval_pass_at_4 the mean of each prompt's best, so it is never below; seeded per step."""
    run = cfg("", tmp_path / "e", num_steps=1, eval_interval=1, eval_size=16, n_samples_per_eval_prompt=4,
              eval_temperature=1.0, max_new_tokens=48, difficulty="medium")  # fmt: skip
    rows = train(run, progress=False)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= r["eval_accuracy"] <= r["eval_pass_at_4"] <= 1
    assert any(r["eval_pass_at_4"] > r["eval_accuracy"] for r in rows)  # some prompts solved by only some samples
    with pytest.raises(ValueError, match="needs --eval-temperature"):
        RLConfig(n_samples_per_eval_prompt=4)


def test_soft_overlong_penalty_enters_the_reward(tmp_path):
    """--overlong-buffer-len = --max-new-tokens, a reward of 0 for everything: each sample's reward is
    -len / max_new_tokens, so the step's reward is minus the mean response length over the limit."""
    rm = tmp_path / "zero.py"
    rm.write_text("def reward(response, label):\n    return 0.0\n")
    rows = train(cfg("", tmp_path / "o", num_steps=1, eval_interval=0, max_new_tokens=40, overlong_buffer_len=40,
                     custom_rm_path=f"{rm}:reward", difficulty="medium", advantage_estimator="rloo"),
                 progress=False)  # fmt: skip
    assert rows[0]["reward"] == pytest.approx(-rows[0]["response_len"] / 40, rel=1e-6)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        RLConfig(overlong_buffer_len=100, max_new_tokens=48)
    with pytest.raises(ValueError, match="advantage_estimator must be one of"):
        RLConfig(advantage_estimator="ppo")


def test_packed_training_takes_the_padded_runs_steps_up_to_rounding(tiny_moe_model, tmp_path):
    """--pack-sequences: the same samples (the first rollout precedes any update), the same metrics to bf16
    rounding of the other GEMM row counts, routing replay included."""
    run = functools.partial(cfg, tiny_moe_model, eval_interval=0, num_steps=1, use_rollout_routing_replay=True,
                            recipe="bf16")  # fmt: skip
    padded, packed = (train(run(tmp_path / str(p), pack_sequences=p), progress=False)[0] for p in (False, True))
    assert padded["reward"] == packed["reward"] and padded["response_len"] == packed["response_len"]
    for key in ("loss", "mismatch_abs_mean", "entropy", "routing_flip_frac"):
        assert abs(padded[key] - packed[key]) <= 0.05 * abs(padded[key]) + 1e-6, (key, padded[key], packed[key])


def test_lr_schedule_warms_up_and_decays_to_min_lr():
    from quantrl.rl.loop import lr_at

    c = RLConfig(lr=1e-4, lr_warmup_steps=4, lr_decay_style="cosine", min_lr=1e-5, num_steps=14)
    assert [lr_at(c, s) for s in (1, 2, 4)] == pytest.approx([2.5e-5, 5e-5, 1e-4])
    assert lr_at(c, 9) == pytest.approx(1e-5 + 0.5 * 9e-5) and lr_at(c, 14) == pytest.approx(1e-5)
    lin = dataclasses.replace(c, lr_decay_style="linear")
    assert lr_at(lin, 9) == pytest.approx(5.5e-5) and lr_at(lin, 20) == pytest.approx(1e-5)  # past the end: min_lr
    assert lr_at(RLConfig(lr=3e-5), 7) == 3e-5
    # the schedule counts optimizer steps: 5 rollout steps x 2 optimizer steps each decay over 10
    per_opt = RLConfig(lr=1e-4, lr_decay_style="linear", num_steps=5, num_steps_per_rollout=2)
    assert lr_at(per_opt, 5) == pytest.approx(5e-5) and lr_at(per_opt, 10) == 0
    with pytest.raises(ValueError, match="lr_decay_style"):
        RLConfig(lr_decay_style="step")
    with pytest.raises(ValueError, match="min_lr"):
        RLConfig(lr=1e-5, min_lr=1e-4)


def test_the_loop_follows_the_lr_schedule_and_logs_entropy(tiny_model, tmp_path):
    rows = train(cfg(tiny_model, tmp_path / "s", eval_interval=0, num_steps=3, lr_warmup_steps=2, entropy_coef=0.01),
                 progress=False)  # fmt: skip
    assert [r["lr"] for r in rows] == pytest.approx([5e-5, 1e-4, 1e-4])
    assert all(r["entropy"] > 0 for r in rows)


def test_custom_reward_function_and_overlong_filter(tmp_path, monkeypatch):
    """--custom-rm-path replaces the math reward (every sample scored by it, the logged reward its mean);
    --overlong-filter takes the loss off samples cut at --max-new-tokens, and only those."""
    log = tmp_path / "calls.txt"
    rm = tmp_path / "rm.py"
    rm.write_text(f"def reward(response, label, prompt):\n    r = float(len(response) % 3 == 0)\n"
                  f"    open({str(log)!r}, 'a').write(f'{{r}}\\n')\n    return r\n")  # fmt: skip
    trained = trained_micro_batches(monkeypatch, "loss_mask")
    run = functools.partial(cfg, "", eval_interval=0, num_steps=2, prompts_per_step=4, n_samples_per_prompt=4,
                            max_new_tokens=21, difficulty="medium", micro_batch_size=64, custom_rm_path=f"{rm}:reward")  # fmt: skip
    for overlong in (False, True):
        trained.clear()
        log.unlink(missing_ok=True)
        rows = train(run(tmp_path / str(overlong), overlong_filter=overlong), progress=False)
        calls = [float(x) for x in log.read_text().split()]
        assert len(calls) == 2 * 16 and [r["reward"] for r in rows] == pytest.approx([sum(calls[:16]) / 16, sum(calls[16:]) / 16])
        assert any(0 < r["truncated_frac"] < 1 for r in rows)  # 21 tokens cut some solutions (18 to 26 long)
        for r, mask in zip(rows, trained):
            cut = round(r["truncated_frac"] * 16)
            assert int((mask.sum(1) == 0).sum()) == (cut if overlong and cut < 16 else 0)  # all cut: all kept


def test_placement_flags_are_checked():
    with pytest.raises(ValueError, match="placement must be one of"):
        RLConfig(placement="slurm")
    with pytest.raises(ValueError, match="needs --placement ray"):
        RLConfig(rollout_num_engines=2)
    with pytest.raises(ValueError, match="needs held-out prompts"):
        RLConfig(eval_size=0)


def test_data_parallel_replicas_take_the_single_trainer_step(tiny_model, tmp_path):
    """--dp-size 2: two trainer replicas split every batch and stay bit-identical (the replica check of
    --check-weight-update-equal runs every step); the first step, sampled before any update, matches
    the single trainer's up to bf16 rounding of the different batch shapes."""
    pytest.importorskip("ray")
    # the embedded model: the tiny one solves no problem, so its advantages, and gradients, would be all zero
    run = functools.partial(cfg, "", placement="ray", threads=1, eval_interval=0, prompts_per_step=4,
                            n_samples_per_prompt=4, max_new_tokens=48, difficulty="medium", is_mode="tis",
                            is_batch_normalize=True)  # the weights' normalization sums over the replicas  # fmt: skip
    one = train(run(tmp_path / "one"), progress=False)
    two = train(run(tmp_path / "two", dp_size=2), progress=False)
    assert [r["weight_version"] for r in two] == [1, 2]
    a, b = one[0], two[0]
    assert a["reward"] == b["reward"] and a["response_len"] == b["response_len"]  # the same samples
    assert a["grad_norm"] > 0  # GRPO's first-step loss is ~0 (ratio 1, mean advantage 0); its gradient is not
    for key in ("grad_norm", "mismatch_abs_mean", "is_weight_mean"):
        assert abs(a[key] - b[key]) <= 0.05 * abs(a[key]), (key, a[key], b[key])
    assert b["loss_tokens"] == a["loss_tokens"]  # the replicas' token counts add up to the batch's
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    with pytest.raises(ValueError, match="needs --placement ray"):
        RLConfig(dp_size=2)
    # the distributed optimizer, stopped after step 1 and resumed from its two shards: the same run, bit for bit
    zero = functools.partial(run, tmp_path / "zero", dp_size=2, use_distributed_optimizer=True, save_interval=1)
    first = train(zero(num_steps=1), progress=False)
    assert sorted(p.name for p in (tmp_path / "zero" / "checkpoints" / "step_000001").glob("optimizer.*")) == [
        "optimizer.0.pt", "optimizer.1.pt"]  # fmt: skip
    assert untimed(first + train(zero(resume=True), progress=False)) == untimed(two)
    with pytest.raises(ValueError, match="nothing to shard"):
        RLConfig(use_distributed_optimizer=True)


def test_ray_run_with_a_two_gpu_engine(tiny_model, tmp_path):
    """--rollout-num-gpus-per-engine 2: the engine is two tensor-parallel actors; each step's sync reaches
    both shards (--check-weight-update-equal checks each), and the train-rollout mismatch stays at the
    level of a one-process engine (the shards' bf16 partial sums round differently, nothing more)."""
    pytest.importorskip("ray")
    run = functools.partial(cfg, tiny_model, eval_interval=0, recipe="bf16")
    threads = torch.get_num_threads()
    try:
        local = train(run(tmp_path / "local"), progress=False)
    finally:
        torch.set_num_threads(threads)
    tp = train(run(tmp_path / "tp", placement="ray", threads=1, rollout_num_gpus_per_engine=2), progress=False)
    assert [r["weight_version"] for r in tp] == [1, 2]
    for a, b in zip(local, tp):
        assert b["mismatch_abs_mean"] < max(3 * a["mismatch_abs_mean"], 5e-3), (a["mismatch_abs_mean"], b["mismatch_abs_mean"])
    with pytest.raises(ValueError, match="needs --placement ray"):
        RLConfig(rollout_num_gpus_per_engine=2)
    with pytest.raises(ValueError, match="rollout-expert-parallel spreads experts"):
        RLConfig(rollout_expert_parallel=True, placement="ray")


def test_colocated_trainer_and_engine_take_the_local_runs_steps(tiny_model, tmp_path):
    """--colocate: trainer replica and engine in one placement-group bundle (one GPU between them on CUDA),
    the engine's KV cache freed after every rollout: the run's numbers are a local run's."""
    pytest.importorskip("ray")
    run = functools.partial(cfg, tiny_model, eval_interval=0, threads=1)
    threads = torch.get_num_threads()
    try:
        local = train(run(tmp_path / "local"), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert untimed(train(run(tmp_path / "colo", placement="ray", colocate=True), progress=False)) == untimed(local)
    with pytest.raises(ValueError, match="--colocate pairs each trainer replica"):
        RLConfig(colocate=True, placement="ray", rollout_num_engines=2)


def test_ray_run_refuses_a_used_run_dir_before_starting_actors(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import ray

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.jsonl").write_text("{}\n")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a run that cannot run"))
    monkeypatch.setattr(ray, "remote", lambda *a, **k: pytest.fail("an actor started for a run that cannot run"))
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg(tiny_model, tmp_path / "x", placement="ray"), progress=False)


@pytest.mark.parametrize("recipe", ["fp8-rollout", "int4-qat"])
def test_moe_model_with_rollout_routing_replay(recipe, tiny_moe_model, tmp_path, monkeypatch):
    from quantrl.rl import grpo

    seen = []
    real = grpo.token_logprobs
    monkeypatch.setattr(grpo, "token_logprobs", lambda *a, **k: seen.append(k.get("routing")) or real(*a, **k))
    rows = train(cfg(tiny_moe_model, tmp_path / recipe, recipe=recipe, use_rollout_routing_replay=True,
                     is_mode="tis"), progress=False)  # fmt: skip
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert 0 <= r["routing_flip_frac"] <= 1 and r["mismatch_abs_mean"] >= 0
    # the loss saw the engine's experts for every micro-batch: [B, T, L_moe=2, k=2], FREE only at the ends
    assert seen and all(x is not None and x.shape[2:] == (2, 2) for x in seen)
    assert all((x[:, 0] >= 0).all() for x in seen)  # the first token of a sequence is always a prompt token


@pytest.mark.parametrize("recipe", ["int4-qat", "fp8"])
def test_deepseek_model_runs_rl_with_routing_replay(recipe, tiny_deepseek_model, tmp_path):
    """Latent attention, the fp32 sigmoid router and its correction bias through rollout, training and the
    checked weight sync (--check-weight-update-equal) of each step, resumed from its checkpoint."""
    run = functools.partial(cfg, tiny_deepseek_model, tmp_path / recipe, recipe=recipe, use_rollout_routing_replay=True,
                            eval_interval=0)  # fmt: skip
    rows = train(run(num_steps=1), progress=False) + train(run(resume=True), progress=False)
    assert [r["step"] for r in rows] == [1, 2] and all(0 <= r["routing_flip_frac"] <= 1 for r in rows)
    assert json.loads((tiny_deepseek_model / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_moe_routing_flips_are_counted_and_replay_needs_moe(tiny_model, tiny_moe_model, tmp_path):
    """BF16 rollout of the trainer's own weights: the two sides route alike up to batch-shape rounding;
    INT4 PTQ rollout moves the router's inputs and some choices flip."""
    bf16 = train(cfg(tiny_moe_model, tmp_path / "a", recipe="bf16", num_steps=1, eval_interval=0,
                     use_rollout_routing_replay=True), progress=False)  # fmt: skip
    ptq = train(cfg(tiny_moe_model, tmp_path / "b", recipe="int4-ptq", num_steps=1, eval_interval=0,
                    use_rollout_routing_replay=True), progress=False)  # fmt: skip
    assert bf16[-1]["routing_flip_frac"] < 0.01 < ptq[-1]["routing_flip_frac"]
    with pytest.raises(ValueError, match="needs a MoE model"):
        RLRun(cfg(tiny_model, tmp_path / "c", use_rollout_routing_replay=True), progress=False)


def test_routing_replay_on_ray_with_two_engines_and_replicas(tiny_moe_model, tmp_path):
    """The engines' routing travels back through Ray, is cut into the replicas' rows with the rest of the
    batch, and the replicas' flip counts add up on the lead: with one engine and one trainer the metrics
    equal the local run's, number for number."""
    pytest.importorskip("ray")
    run = functools.partial(cfg, tiny_moe_model, use_rollout_routing_replay=True, recipe="int4-ptq", threads=1,
                            eval_interval=0, num_steps=1)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        local = train(run(tmp_path / "local"), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert untimed(train(run(tmp_path / "ray", placement="ray"), progress=False)) == untimed(local)
    assert local[-1]["routing_flip_frac"] > 0
    rows = train(run(tmp_path / "dp", placement="ray", rollout_num_engines=2, dp_size=2, prompts_per_step=4),
                 progress=False)  # fmt: skip
    assert 0 < rows[-1]["routing_flip_frac"] < 1


def test_pretrain_stops_at_its_time_limit_and_saves(tmp_path):
    summary = pretrain(PretrainConfig(out_dir=str(tmp_path / "m"), hidden_size=128, num_layers=1, intermediate_size=128,
                                      steps=100_000, batch_size=8, num_problems=500, max_seconds=1.0), progress=False)  # fmt: skip
    assert 0 < summary["steps_done"] < 100_000 and summary["train_seconds"] < 10
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "pretrain_summary.json").exists()
