"""--custom-rm-path: a user's reward function, found by module or file path, called with what it asks for."""

import math

import pytest

from quantrl.rl.custom_reward import load_reward_fn
from quantrl.rl.data import Prompt

P = Prompt(text="What is 2+2?", label="4", index=7, metadata={"difficulty": "easy"})


def test_a_file_function_gets_the_arguments_it_names(tmp_path):
    f = tmp_path / "my_rm.py"
    f.write_text(
        "def plain(response, label):\n    return response.strip() == label\n"
        "def with_prompt(response, label, prompt):\n    return float(len(prompt))\n"
        "def everything(response, label, **kw):\n    return len(kw['metadata']['difficulty']) + (kw['prompt'] == 'What is 2+2?')\n"
    )
    assert load_reward_fn(f"{f}:plain")(" 4 ", P) == 1.0 and load_reward_fn(f"{f}:plain")("5", P) == 0.0
    assert load_reward_fn(f"{f}:with_prompt")("x", P) == len(P.text)
    assert load_reward_fn(f"{f}:everything")("x", P) == 5.0


def test_a_module_function_by_either_spelling():
    for spec in ("quantrl.rl.rewards:math_reward", "quantrl.rl.rewards.math_reward"):
        assert load_reward_fn(spec)("so the answer is \\boxed{4}", P) == 1.0


def test_bad_specs_and_bad_values_are_named(tmp_path):
    f = tmp_path / "rm.py"
    f.write_text("def nan(response, label):\n    return float('nan')\ndef text(response, label):\n    return 'good'\n")
    with pytest.raises(ValueError, match="row 7"):
        load_reward_fn(f"{f}:nan")("x", P)
    with pytest.raises(ValueError, match="finite number"):
        load_reward_fn(f"{f}:text")("x", P)
    with pytest.raises(ValueError, match="no function 'missing'"):
        load_reward_fn(f"{f}:missing")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_reward_fn(f"{tmp_path / 'nope.py'}:fn")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward_fn("no_such_package_xyz.module:fn")
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("reward")
    assert math.isfinite(load_reward_fn("quantrl.rl.rewards:math_reward")("", P))
