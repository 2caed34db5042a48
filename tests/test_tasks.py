"""Embedded arithmetic task and its character tokenizer: exact worked answers, determinism, difficulty, rewards,
encode/decode round trips, and a save_pretrained / AutoTokenizer round trip."""

import re

import pytest
from transformers import AutoTokenizer

from quantrl.rl.data import load_prompts
from quantrl.tasks import DIFFICULTIES, Difficulty, build_tokenizer, make_problems, make_split, reward, write_jsonl
from quantrl.tasks.tokenizer import CHARS, SPECIAL_TOKENS

EXPR = re.compile(r"what is (\d+)([-+*])(\d+)\?\n")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def all_problems():
    return [p for i, name in enumerate(DIFFICULTIES) for p in make_problems(40, seed=i, difficulty=name)]


def test_solutions_are_exact_worked_answers():
    for p in all_problems():
        a, op, b = EXPR.fullmatch(p.prompt).groups()
        assert int(p.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        work, boxed = p.solution.split("\n")
        assert boxed == f"\\boxed{{{p.answer}}}"
        steps = work.split("=")
        assert steps[0] == f"{a}{op}{b}" and steps[-1] == p.answer
        for s in steps:  # every step of the chain is the same number (digits and + - * only)
            assert re.fullmatch(r"-?[\d+*-]+", s) and eval(s) == int(p.answer), p.solution
    # a*bcd=a*b00+a*c0+a*d=p1+p2+p3=result: one partial product per non-zero digit of the second factor
    most = 0
    for p in make_problems(30, 0, Difficulty(3, 3, ("*",), mul_max_digits=3)):
        b = EXPR.fullmatch(p.prompt).group(3)
        parts = len(b) - b.count("0")
        assert p.solution.count("=") == (3 if parts > 1 else 1)
        if parts > 1:
            assert p.solution.split("=")[1].count("*") == parts
        most = max(most, parts)
    assert most == 3


def test_reward_of_correct_and_wrong_answers():
    for p in make_problems(30, seed=5, difficulty="hard"):
        assert reward(p.solution, p) == 1.0
        wrong = p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{int(p.answer) + 1}}}")
        assert reward(wrong, p) == 0.0
        assert reward(p.solution[: p.solution.index("\\boxed") + 8], p) == 0.0  # cut inside the box
        assert reward("", p) == 0.0


def test_problems_are_deterministic_and_prefix_stable():
    a = make_problems(50, seed=7)
    assert a == make_problems(50, seed=7) and a[:20] == make_problems(20, seed=7)
    assert a != make_problems(50, seed=8)
    assert make_problems(0, seed=7) == []


def test_difficulty_changes_the_numbers():
    def operands(problems):
        return [(int(x), op, int(y)) for p in problems for x, op, y in [EXPR.fullmatch(p.prompt).groups()]]

    easy, hard = operands(make_problems(200, 0, "easy")), operands(make_problems(200, 0, "hard"))
    assert {op for _, op, _ in easy} == {"+", "-"} and {op for _, op, _ in hard} == {"+", "-", "*"}
    assert max(max(x, y) for x, _, y in easy) < 100 and min(min(x, y) for x, op, y in hard if op != "*") >= 10
    assert max(max(x, y) for x, _, y in hard) >= 1000
    assert all(y < 100 for _, op, y in hard if op == "*")  # mul_max_digits=2
    only_mul = operands(make_problems(50, 0, Difficulty(2, 2, ("*",), mul_max_digits=1)))
    assert all(op == "*" and 10 <= x < 100 and y < 10 for x, op, y in only_mul)
    with pytest.raises(ValueError, match="ops"):
        Difficulty(ops=("/",))
    with pytest.raises(ValueError, match="min_digits"):
        Difficulty(3, 2)
    with pytest.raises(ValueError, match="presets"):
        make_problems(1, 0, "impossible")


def test_split_holds_out_unseen_prompts_and_jsonl_round_trip(tmp_path):
    train, held = make_split(100, 20, seed=0, difficulty="medium")
    assert len(held) == 20 and not {p.prompt for p in train} & {p.prompt for p in held}
    with pytest.raises(ValueError, match="held-out"):
        make_split(200, 50, seed=0, difficulty=Difficulty(1, 1, ("+",)))  # only 100 distinct problems
    ps = load_prompts(write_jsonl(held, tmp_path / "eval.jsonl"))
    assert [(p.text, p.label) for p in ps] == [(h.prompt, h.answer) for h in held]


def test_tokenizer_round_trips_prompts_and_solutions(tok):
    assert len(tok) == len(SPECIAL_TOKENS) + len(CHARS) <= 64
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for p in all_problems():
        for text in (p.prompt, p.solution, p.prompt + p.solution):
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
            assert tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True) == text
    text = "what is 1 , 2?\n\\boxed{(3/4)}  end."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # no space cleanup
    assert tok("Ab")["input_ids"][1] == tok.unk_token_id  # uppercase is outside the vocabulary
    assert tok.convert_ids_to_tokens(tok("1<eos>")["input_ids"]) == ["<bos>", "1", "<eos>"]


def test_tokenizer_saves_and_loads_with_autotokenizer(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    p = make_problems(1, 3, "hard")[0]
    assert back(p.prompt + p.solution)["input_ids"] == tok(p.prompt + p.solution)["input_ids"]
    assert back.get_vocab() == tok.get_vocab() and back.eos_token_id == tok.eos_token_id
    chat = back.apply_chat_template([{"role": "user", "content": p.prompt.strip()}], add_generation_prompt=True,
                                    tokenize=False)  # fmt: skip
    assert chat == f"<bos>user: {p.prompt.strip()}\nassistant: "
    ids = back(chat, add_special_tokens=False)["input_ids"]
    assert ids.count(back.bos_token_id) == 1 and back.unk_token_id not in ids
    turn = back.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "3"}], tokenize=False
    )
    assert turn == "<bos>user: hi\nassistant: 3<eos>\n"
    assert build_tokenizer(chat_template=False).chat_template is None
