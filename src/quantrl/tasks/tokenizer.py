"""A character-level tokenizer for the embedded arithmetic task, as a real ``transformers`` fast tokenizer.

One token per character (digits, lowercase letters, space, newline, ``+-*=?:.,()/\\{}``) plus
``<pad> <bos> <eos> <unk>``: 56 tokens, so the embedded model's embedding and lm_head stay tiny and every
digit is its own token (multi-digit BPE merges make arithmetic needlessly hard for a small model). It is
built offline with ``tokenizers`` (WordLevel over a one-character split, ``Fuse`` decoder so decoding
concatenates instead of joining with spaces), saved with ``save_pretrained`` next to the model, and read
back by ``AutoTokenizer.from_pretrained``.

Special tokens: ``tok(text)`` prepends ``<bos>`` (``add_special_tokens=False`` does not); ``<eos>`` is never
added by encoding: the caller appends ``eos_token_id`` to supervised targets, and generation stops on it.
The optional chat template renders ``<bos>``, then ``role: content\\n`` per message (``<eos>`` closes
assistant turns), then ``assistant: `` as the generation prompt; its output already holds ``<bos>``, so
encode it with ``add_special_tokens=False``. Characters outside the vocabulary (e.g. uppercase) map to ``<unk>``.
"""

from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = tuple(string.digits + string.ascii_lowercase + " \n" + "+-*=?:.,()/\\{}")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    # an explicit '\n': transformers renders with trim_blocks, which eats a raw newline after {% endif %}
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def vocab() -> dict[str, int]:
    """token -> id: the special tokens first (<pad>=0, <bos>=1, <eos>=2, <unk>=3), then CHARS in order."""
    return {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}


def build_tokenizer(*, chat_template: bool = True, model_max_length: int = 1024):
    """The character tokenizer as a ``transformers.PreTrainedTokenizerFast`` (offline, deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    v = vocab()
    tok = Tokenizer(models.WordLevel(v, unk_token="<unk>"))
    # [\s\S]: every character, newline included (a bare "." would skip "\n")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", v["<bos>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocab: keeps their ids, never split
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # "1 , 2" must decode to itself, not "1, 2"
        model_max_length=model_max_length,
    )  # fmt: skip
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf
