"""Rule-based math reward: pull the final answer out of a response, normalize it, compare with the label.

Extraction (``extract_final_answer``), first rule that finds something wins:
  1. the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched; an unclosed
     one, e.g. a response cut at max length, is skipped), or ``\\boxed 5``; a text that has ``\\boxed`` but
     no complete one has no answer (rules 2-3 would reward a truncated response for a stray number);
  2. the last explicit marker line: ``Answer: X`` / ``the answer is X`` / GSM8K's ``#### X``; X is what follows
     the line's last marker (so ``Final Answer: The final answer is $5$.`` gives ``5``), without markdown bold
     or ``\\(..\\)``, up to the end of its sentence (``5. I hope...``, ``42, since...``); when X is prose
     around math, the math before the first word (``18 dollars``, ``\\frac{1}{2} cm``), else its first number;
  3. the last number in the text (sign, thousands separators, decimals, ``a/b``).

Normalization (``normalize_answer``) removes presentation only: spaces, ``$`` and ``\\$``, ``\\text{..}``/
``\\mathrm{..}`` wrappers, ``\\left``/``\\right``, thin spaces, degree and percent signs, a trailing period, a
leading ``+``, a leading ``x =``; ``\\{``/``\\}`` become braces, ``\\sqrt3`` becomes ``\\sqrt{3}``;
``\\frac{a}{b}``/``\\dfrac``/``\\frac12`` become ``a/b`` (a sign in b moves to the front); thousands commas
(``1,000`` and ``1{,}000``, not a spaced list ``1, 234``) go; numbers get
one spelling (``1.0``/``1.`` -> ``1``, ``1.50`` -> ``1.5``, ``.5`` -> ``0.5``, ``-0`` -> ``0``, ``4/2`` -> ``2``).
``math_reward`` then also accepts numeric equality across spellings (``0.5`` == ``1/2`` == ``2/4``), exact
(``fractions.Fraction``), never within a tolerance: a reward that is noisy near the answer teaches rounding.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_CMDS = ("\\boxed", "\\fbox")
_MARKER = re.compile(r"(?:answer\s*(?:is\b\s*:?|:)|####)[ \t]*", re.IGNORECASE)
_MARKUP = re.compile(r"\*+|\\[()\[\]]")  # markdown bold, \( \) \[ \]: how an answer is shown
_SENTENCE_END = re.compile(r"[.;!?](?=\s|$)|,\s+(?=[A-Za-z]{2})")  # not a decimal point, not a list "1, 2"
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")  # prose: a word that is not a LaTeX command
_SIGN = r"(?:(?<![\w)\]}])-)?"  # a minus counts as a sign only where it cannot be a binary minus
_NUMBER = re.compile(_SIGN + r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_FRACTION = re.compile(r"-?\d+/\d+")
# markup that changes how an answer looks, not what it is
_PRESENTATION = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$",
                 "^\\circ", "^{\\circ}", "\u00b0", "\\%", "%")
_SPELLING = (("{,}", ","), ("\\{", "{"), ("\\}", "}"), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"))


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the ``{...}`` opening at ``text[start]`` and the index after its ``}``; None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def _last_boxed(text: str) -> str | None:
    found: tuple[int, str] | None = None
    for cmd in _BOX_CMDS:
        for m in re.finditer(re.escape(cmd) + r"(?![A-Za-z])", text):
            i = m.end()
            while i < len(text) and text[i] == " ":
                i += 1
            if i < len(text) and text[i] == "{":
                got = _braced(text, i)
                if got is None:
                    continue
                content = got[0]
            else:  # \boxed 5: one whitespace-delimited token
                tok = re.match(r"[^\s$]+", text[i:])
                if tok is None:
                    continue
                content = tok.group(0)
            if found is None or m.start() > found[0]:
                found = (m.start(), content)
    return None if found is None else found[1].strip()


def extract_final_answer(text: str) -> str | None:
    """The final answer of a response (raw, not normalized), or None when there is none (rules above)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if any(cmd in text for cmd in _BOX_CMDS):
        return None  # it tried to box and was cut off: a stray earlier number is not its answer
    for line in reversed(text.splitlines()):
        found = list(_MARKER.finditer(line))
        if found and (answer := _marker_answer(line[found[-1].end() :])):
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _marker_answer(rest: str) -> str:
    """What a marker line says after its marker: the first sentence, or the number in it when it is prose."""
    s = _MARKUP.sub("", rest).strip()
    if end := _SENTENCE_END.search(s):
        s = s[: end.start()].strip()
    if (word := _WORD.search(s)) and (numbers := _NUMBER.findall(s)):
        head = s[: word.start()].strip()  # "\frac{1}{2} cm", "x = 5 meters": the math before the prose
        return head if re.search(r"\d", head) else numbers[0]
    return s


def _unwrap(s: str, cmd: str) -> str:
    """``\\cmd{X}`` -> ``X`` everywhere, with nested braces in X."""
    while (i := s.find(cmd + "{")) >= 0:
        got = _braced(s, i + len(cmd))
        if got is None:
            break
        s = s[:i] + got[0] + s[got[1] :]
    return s


def _frac_arg(s: str, i: int) -> tuple[str, int] | None:
    """One ``\\frac`` argument at ``s[i]``: ``{...}`` or a single character (``\\frac12``)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        return _braced(s, i)
    return s[i], i + 1


def _atom(x: str) -> bool:
    """One term: no operator outside a leading sign (``3``, ``-1``, ``\\pi``, ``3\\pi``, ``\\sqrt{3}``, ``x^2``)."""
    return re.fullmatch(r"-?[^-+*/=<>,\s()]+", x) is not None


def _fracs(s: str) -> str:
    """``\\frac{a}{b}`` -> ``a/b`` (parenthesized when a or b is not a single term), innermost first."""
    while (i := s.rfind("\\frac")) >= 0:
        num = _frac_arg(s, i + len("\\frac"))
        den = num and _frac_arg(s, num[1])
        if not num or not den:
            break
        a, b = (x.strip() for x in (num[0], den[0]))
        if b.startswith("-") and _atom(b) and _atom(a):  # 3/-4 -> -3/4
            a, b = (a[1:] if a.startswith("-") else "-" + a), b[1:]
        a, b = (x if _atom(x) else f"({x})" for x in (a, b))
        s = s[:i] + f"{a}/{b}" + s[den[1] :]
    return s


def _canonical_number(s: str) -> str:
    if _FRACTION.fullmatch(s):
        num, den = s.split("/")
        if int(den) == 0:
            return s
        f = Fraction(int(num), int(den))
        return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    if _DECIMAL.fullmatch(s):
        neg, body = s.startswith("-"), s.lstrip("-")
        whole, _, frac = body.partition(".")
        whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
        body = whole + ("." + frac if frac else "")
        return "-" + body if neg and body != "0" else body
    return s


def normalize_answer(s: str) -> str:
    """One spelling per answer (see the module note); numbers canonical, everything else compared as text."""
    s = s.strip().replace("\u2212", "-")  # unicode minus
    for cmd in ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox"):
        s = _unwrap(s, cmd)
    for junk in _PRESENTATION:
        s = s.replace(junk, "")
    for spelling, canonical in _SPELLING:
        s = s.replace(spelling, canonical)
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)
    s = _fracs(s)
    # 1,234,567 -> 1234567, before spaces go: a list "1,2" or "1, 234" keeps its comma
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = re.sub(r"^[A-Za-z]=(?=.)", "", s)  # "x=5" -> "5"
    s = s.removeprefix("+")
    return _canonical_number(s)


def _as_number(s: str) -> Fraction | None:
    if _FRACTION.fullmatch(s):
        num, den = s.split("/")
        return Fraction(int(num), int(den)) if int(den) else None
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    return None


def answers_match(pred: str, label: str) -> bool:
    """Normalized text equality, or exact numeric equality (``0.5`` == ``1/2``)."""
    p, t = normalize_answer(pred), normalize_answer(label)
    if not p or not t:
        return False
    if p == t:
        return True
    pn, tn = _as_number(p), _as_number(t)
    return pn is not None and pn == tn


def math_reward(response: str, label: str) -> float:
    """1.0 if the response's final answer equals ``label``, else 0.0 (no answer: 0.0).

    A label that is itself a worked solution (contains ``\\boxed`` or ``####``) is reduced to its final answer
    first, so GSM8K-style labels work as they come.
    """
    label = str(label)
    if "\\boxed" in label or "####" in label:
        label = extract_final_answer(label) or label
    pred = extract_final_answer(response)
    return 1.0 if pred is not None and answers_match(pred, label) else 0.0


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_len - buffer`` tokens, then falling linearly to
    ``-factor`` at ``max_len`` (a response cut there gets the whole penalty)."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    return -factor * min(1.0, (length - (max_len - buffer)) / buffer)
