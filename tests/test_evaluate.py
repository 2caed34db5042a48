"""``quantrl eval``: the RL loop's held-out evaluation run on its own, on any checkpoint format."""

import json

import pytest
import torch

from quantrl.rl.evaluate import EvalConfig, eval_figures, evaluate
from quantrl.rl.loop import RLConfig, train


def test_eval_figures_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    assert eval_figures(r, 2) == {"eval_accuracy": 0.375, "eval_pass_at_2": 0.5}
    assert eval_figures(r, 1) == {"eval_accuracy": 0.375}


def test_embedded_eval_is_the_loops_step_zero_eval(tmp_path):
    """Greedy, on the loop's held-out split: the accuracy ``quantrl train`` logs before its first step."""
    kw = {"eval_size": 16, "difficulty": "easy", "max_new_tokens": 24}
    rows = train(RLConfig(run_dir=str(tmp_path / "run"), num_steps=1, prompts_per_step=2, n_samples_per_prompt=2,
                          eval_interval=1, save_interval=0, **kw), progress=False)  # fmt: skip
    out = evaluate(EvalConfig(out=str(tmp_path / "eval.json"), **kw))
    assert out["eval_accuracy"] == rows[0]["eval_accuracy"] and out["prompts"] == 16
    assert json.loads((tmp_path / "eval.json").read_text())["eval_accuracy"] == out["eval_accuracy"]


def test_sampled_eval_on_a_prompt_file_with_a_custom_reward(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"q": f"what is {a}+{b}?\n", "answer": {"value": str(a + b)}}) + "\n"
                            for a, b in ((3, 4), (10, 5), (21, 30))))  # fmt: skip
    rm = tmp_path / "rm.py"
    rm.write_text("def reward(response, label, prompt):\n    return float(label in response) + 0.0 * len(prompt)\n")
    samples = tmp_path / "samples.jsonl"
    out = evaluate(EvalConfig(eval_data=str(data), input_key="q", label_key="answer.value",
                              custom_rm_path=f"{rm}:reward", n_samples_per_eval_prompt=3, eval_temperature=1.0,
                              save_samples=str(samples), max_new_tokens=24))  # fmt: skip
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, s) for p in range(3) for s in range(3)]
    assert out["eval_accuracy"] == pytest.approx(sum(r["reward"] for r in rows) / 9)
    assert out["eval_pass_at_3"] >= out["eval_accuracy"] and out["prompts"] == 3 and out["tokens_per_s"] > 0


def test_cli_and_errors(tmp_path, capsys):
    from quantrl.cli import main

    assert main(["eval", "--eval-size", "4", "--max-new-tokens", "16", "--kv-cache-dtype", "fp8_e4m3"]) == 0
    assert "accuracy" in capsys.readouterr().out
    # a BF16 checkpoint next to its FP8 conversion, one table and one JSON list
    from quantrl.checkpoint.convert_fp8 import convert_to_fp8
    from quantrl.rl.loop import default_model_dir

    fp8 = convert_to_fp8(default_model_dir(), tmp_path / "fp8", progress=False).output_dir
    out = tmp_path / "both.json"
    assert main(["eval", "--eval-size", "4", "--max-new-tokens", "16", "--compare", default_model_dir(), str(fp8),
                 "--out", str(out)]) == 0  # fmt: skip
    both = json.loads(out.read_text())
    assert [b["model"] for b in both] == [default_model_dir(), str(fp8)]
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["eval", "--compare", str(fp8), "--save-samples", str(tmp_path / "s.jsonl")]) == 2
    assert "one at a time" in capsys.readouterr().out
    assert main(["eval", "--eval-data", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().out
    with pytest.raises(ValueError, match="eval-temperature"):
        EvalConfig(n_samples_per_eval_prompt=4)
