"""Tokenizer, chat template and streaming detokenization.

Wraps a `tokenizers.Tokenizer` (from a Hugging Face tokenizer.json, or built from GGUF metadata) and
renders the model's own chat template with jinja2 (ChatML for SmolLM2 and Qwen; Qwen3's template
also reads `enable_thinking`, which ringserve passes as False unless asked: served answers come
without a reasoning block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

# A ChatML template for models that ship none (SmolLM2's own template is ChatML too).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Token strings that end a turn in common chat formats; any present in the vocabulary stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>")

# Pre-tokenizer splits by llama.cpp's `tokenizer.ggml.pre` name. The GPT-2 regex is what
# pre_tokenizers.ByteLevel(use_regex=True) applies; Llama 3 uses its own.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 / Qwen2.5 / Qwen3 (`tokenizer.ggml.pre` "qwen2"): Llama 3's split with single digits, after NFC
QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


class ChatTemplateError(ValueError):
    pass


@dataclass
class Tokenizer:
    """Text <-> token ids, plus the chat template and the ids that stop generation."""

    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    add_bos: bool = False
    stop_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self):
        if not self.stop_ids:
            ids = {self.backend.token_to_id(t) for t in END_OF_TURN_TOKENS}
            if self.eos_token is not None:
                ids.add(self.backend.token_to_id(self.eos_token))
            self.stop_ids = frozenset(i for i in ids if i is not None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.add_bos if add_bos is None else add_bos
        if bos and self.bos_token is not None:
            ids = [self.backend.token_to_id(self.bos_token)] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    enable_thinking: bool = False) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's own chat template.
        `enable_thinking` is passed to the template as a variable (Qwen3 opens an empty reasoning
        block when it is false; templates that do not read it ignore it)."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatTemplateError(f"each chat message needs 'role' and 'content', got {m!r}")
        template = self.chat_template or CHATML_TEMPLATE

        def raise_exception(msg):
            raise ChatTemplateError(f"the model's chat template refused the messages: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking, bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"cannot render the model's chat template: {e}") from e

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    enable_thinking: bool = False) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                enable_thinking=enable_thinking)
        # the template writes the BOS token itself where the model wants one
        return self.encode(text, add_bos=False)

    def encode_turn(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    enable_thinking: bool = False) -> list[int]:
        """Tokens of `messages` as a continuation of a conversation already in a session: rendered
        after a placeholder turn and cut after it, so the template's default system prompt (which
        it adds to a conversation's first turn) is not repeated."""
        head = [{"role": "user", "content": "\u2063"}]
        before = self.render_chat(head, add_generation_prompt=False)
        full = self.render_chat(head + list(messages), add_generation_prompt=add_generation_prompt,
                                enable_thinking=enable_thinking)
        if not full.startswith(before):  # a template that is not prefix-stable: render the turn alone
            return self.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                    enable_thinking=enable_thinking)
        return self.encode(full[len(before):], add_bos=False)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a stream of token ids into text deltas without splitting multi-byte characters.

    Decodes a short window of recent tokens and emits only the settled suffix, so the cost per token
    is constant (not quadratic in the answer's length).
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # tokens before this index are fully emitted
        self.read = 0  # text of ids[prefix:read] is already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def bpe_from_gguf(tokens: list[str], merges: list[str], token_types: Iterable[int] | None,
                  pre: str | None) -> HFTokenizer:
    """Build a byte-level BPE tokenizer from GGUF `tokenizer.ggml.*` metadata (model "gpt2")."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "qwen2":  # Qwen's tokenizer.json: NFC, then its split, then bytes
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":  # SmolLM's own tokenizer.json: every digit alone, then the GPT-2 split
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    types = list(token_types or [])
    special = [t for t, ty in zip(tokens, types) if ty == 3]  # CONTROL
    user = [t for t, ty in zip(tokens, types) if ty == 4]  # USER_DEFINED
    from tokenizers import AddedToken
    if special:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tk
