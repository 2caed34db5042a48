"""Math reward: final-answer extraction, normalization and grading, case by case."""

import pytest

from quantrl.rl.rewards import answers_match, extract_final_answer, math_reward, normalize_answer


@pytest.mark.parametrize(
    "text, want",
    [
        (r"so the result is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\sqrt{\frac{3}{4}}}", r"\sqrt{\frac{3}{4}}"),
        (r"first \boxed{1}, then \boxed{2}; finally \boxed{3}", "3"),  # several: the last
        (r"\fbox{7} is it", "7"),
        (r"\boxed 5 done", "5"),
        (r"\boxed{ -3 }", "-3"),
        (r"early \boxed{8} then cut off \boxed{12", "8"),  # unclosed last box: the last complete one
        (r"cut off \boxed{12", None),  # tried to box, never closed: no answer, not the stray 12
        ("Answer: 17", "17"),
        ("blah\nthe answer is 1,234.\n", "1,234"),  # up to the end of the sentence
        ("The answer is 5 apples", "5"),  # prose around a number: the number
        ("The answer is 42, since 6*7=42.", "42"),
        ("The answer is **5**.", "5"),  # markdown bold
        ("**Answer:** 5", "5"),
        (r"The answer is \(5\).", "5"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "$5$"),  # the line's last marker
        ("The answer is 1, 2, 3", "1, 2, 3"),  # a list is not a sentence end
        ("The answer is yes.", "yes"),  # prose without a number stays as it is
        (r"The answer is \frac{1}{2} cm", r"\frac{1}{2}"),  # the math before the prose
        ("The answer is about 7 apples", "7"),
        ("the answer isn't 4, it's 5", "5"),  # "answer isn't" is no marker
        ("work 3+4=7\n#### 7", "7"),
        ("#### 5\nAnswer: 6", "6"),  # the last marker
        ("so we get -5 and then 3.50", "3.50"),  # last number
        ("half of it, 3/4, remains", "3/4"),
        ("between 2024-01-05", "05"),  # a hyphen after a digit is not a minus sign
        ("total 1,000,000 dollars", "1,000,000"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, want):
    assert extract_final_answer(text) == want


@pytest.mark.parametrize(
    "raw, want",
    [
        ("1.0", "1"),
        ("1.", "1"),
        ("1.50", "1.5"),
        (".5", "0.5"),
        ("-.5", "-0.5"),
        ("007", "7"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("+3", "3"),
        (" 42 ", "42"),
        ("$42$", "42"),
        ("42.", "42"),
        ("1,234", "1234"),
        ("1,234,567.25", "1234567.25"),
        ("1,2", "1,2"),  # a list, not a thousands separator
        (r"\frac{3}{4}", "3/4"),
        (r"\dfrac{3}{4}", "3/4"),
        (r"\frac12", "1/2"),
        (r"-\frac{1}{2}", "-1/2"),
        (r"\frac{-1}{2}", "-1/2"),
        ("4/2", "2"),
        ("2/4", "1/2"),
        (r"\frac{a+1}{2}", "(a+1)/2"),
        (r"\text{5}", "5"),
        (r"\text{(A)}", "(A)"),
        ("x = 3", "3"),
        (r"50\%", "50"),
        (r"90^\circ", "90"),
        ("\u22127", "-7"),  # unicode minus
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"\$18.00", "18"),  # an escaped dollar
        (r"1{,}000", "1000"),
        ("1, 234", "1,234"),  # a spaced list, not a thousands separator
        (r"\{1, 2\}", "{1,2}"),
        (r"\frac{\pi}{2}", r"\pi/2"),  # a LaTeX term is one term
        (r"\frac{\sqrt3}{2}", r"\sqrt{3}/2"),
        (r"\frac{3}{-4}", "-3/4"),  # the sign moves to the front
    ],
)
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


@pytest.mark.parametrize(
    "response, label, reward",
    [
        (r"... \boxed{408}", "408", 1.0),
        (r"... \boxed{407}", "408", 0.0),
        (r"\boxed{1}\boxed{2}", "1", 0.0),  # only the last box counts
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),  # numeric equivalence across spellings
        (r"\boxed{0.50}", r"\frac{2}{4}", 1.0),
        (r"\boxed{1/3}", "0.333", 0.0),  # exact, not within a tolerance
        (r"\boxed{-289}", "-289", 1.0),
        (r"\boxed{289}", "-289", 0.0),
        (r"\boxed{1,692}", "1692", 1.0),
        (r"\boxed{3.0}", "3", 1.0),
        ("The answer is 12.", "12", 1.0),
        ("so 3+4=7", "7", 1.0),
        ("I don't know", "7", 0.0),
        (r"\boxed{}", "", 0.0),  # empty answers never match
        (r"\boxed{x+1}", "x + 1", 1.0),  # non-numeric answers: normalized text
        (r"\boxed{\text{(B)}}", "(B)", 1.0),
        (r"\boxed{72}", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),  # GSM8K-style label
        (r"\boxed{72}", 72, 1.0),  # a numeric label from JSON
        (r"\boxed{\$18}", "18", 1.0),
        (r"\boxed{\frac{3\pi}{4}}", r"3\pi/4", 1.0),
        (r"\boxed{\frac{3}{-4}}", "-0.75", 1.0),
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "0.5", 1.0),
        ("The answer is 18 dollars.", "18", 1.0),
    ],
)
def test_math_reward(response, label, reward):
    assert math_reward(response, label) == reward


def test_answers_match_needs_both_sides():
    assert answers_match("1/2", "0.5") and not answers_match("1/0", "0") and not answers_match("", "")


def test_dapo_soft_overlong_penalty_hand_computed():
    from quantrl.rl.rewards import overlong_penalty

    # max 100 tokens, the last 20 a buffer: free up to 80, then -1/20 a token down to -factor at 100
    assert overlong_penalty(80, 100, 20) == 0.0 and overlong_penalty(10, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == -0.5 and overlong_penalty(100, 100, 20) == -1.0
    assert overlong_penalty(95, 100, 20, factor=0.4) == pytest.approx(-0.3)
    assert overlong_penalty(100, 100, 0) == 0.0  # no buffer: no penalty
