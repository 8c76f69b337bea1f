"""Tokenizer, chat template and streaming detokenization.

Wraps a `tokenizers.Tokenizer` (from a Hugging Face tokenizer.json, or built from GGUF metadata) and
renders the model's own chat template with jinja2 (ChatML for SmolLM2 and Qwen; Qwen3's template
also reads `enable_thinking`, which ringserve passes as False unless asked: served answers come
without a reasoning block).

Control tokens come only from the template. A special-token string inside text or a message
("<|im_start|>system ...") is tokenized as the plain text it spells, so a user cannot open a turn of
another role (chat-role injection): `encode` reads special tokens as text unless told otherwise, and
`encode_chat` / `encode_turn` render the template with the messages' special-token strings hidden
behind markers, then give ids of control tokens only to what the template itself wrote.
"""

from __future__ import annotations

import re
import secrets
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
        self._setup_specials()

    def _setup_specials(self) -> None:
        """A second backend that reads special-token strings as text (user content goes through it),
        and the patterns that find special-token strings: exactly (to hide them in messages) and with
        each token's own lstrip / rstrip whitespace (to split a rendered template as the backend does)."""
        self._plain = HFTokenizer.from_str(self.backend.to_str())
        self._plain.encode_special_tokens = True
        added = [a for a in self.backend.get_added_tokens_decoder().values() if a.special and a.content]
        added.sort(key=lambda a: -len(a.content))  # the longest first, where one is a prefix of another
        self._specials = [a.content for a in added]
        self._special_index = {t: i for i, t in enumerate(self._specials)}
        self._hide_re = re.compile("|".join(re.escape(t) for t in self._specials)) if added else None
        self._split_re = re.compile("(" + "|".join(
            (r"\s*" if a.lstrip else "") + re.escape(a.content) + (r"\s*" if a.rstrip else "") for a in added)
            + ")") if added else None

    def __getstate__(self):  # the plain backend's flag does not survive pickling: rebuild it
        derived = ("_plain", "_hide_re", "_split_re", "_specials", "_special_index")
        return {k: v for k, v in self.__dict__.items() if k not in derived}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup_specials()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None, special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. A special-token string in it ("<|im_start|>") is read as the text it
        spells; `special_tokens=True` reads it as the control token instead — only for text the caller
        wrote itself (a rendered template), never for text from a user."""
        backend = self.backend if special_tokens else self._plain
        ids = backend.encode(text, add_special_tokens=False).ids
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
        """Token ids of `messages` rendered with the chat template, as the start of a conversation.
        Control tokens come only from the template; special-token strings inside the messages are text."""
        text, unhide = self._render_hidden(messages, add_generation_prompt=add_generation_prompt,
                                           enable_thinking=enable_thinking)
        # the template writes the BOS token itself where the model wants one
        return self._encode_rendered(text, unhide)

    def encode_turn(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    enable_thinking: bool = False) -> list[int]:
        """Tokens of `messages` as a continuation of a conversation already in a session: rendered
        after a placeholder turn and cut after it, so the template's default system prompt (which
        it adds to a conversation's first turn) is not repeated. Special-token strings inside the
        messages are text, as in `encode_chat`."""
        head = [{"role": "user", "content": "\u2063"}]
        before = self.render_chat(head, add_generation_prompt=False)
        full, unhide = self._render_hidden(head + list(messages), add_generation_prompt=add_generation_prompt,
                                           enable_thinking=enable_thinking)
        if not full.startswith(before):  # a template that is not prefix-stable: render the turn alone
            return self.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                    enable_thinking=enable_thinking)
        return self._encode_rendered(full[len(before):], unhide)

    def _render_hidden(self, messages: Sequence[dict], **kw) -> tuple[str, re.Pattern | None]:
        """The template rendered with each special-token string inside the messages' string fields
        replaced by a marker: private-use characters around a per-call random nonce and the token's
        index, which neither the template's own text nor a user's text can spell. Returns the text and
        the pattern that finds the markers."""
        if self._hide_re is None:
            return self.render_chat(messages, **kw), None
        nonce = secrets.token_hex(8)
        index = self._special_index

        def hide(value):
            if not isinstance(value, str):
                return value
            return self._hide_re.sub(lambda m: f"\U000F0000{nonce}.{index[m.group(0)]}\U000F0001", value)

        hidden = [{k: hide(v) for k, v in m.items()} if isinstance(m, dict) else m for m in messages]
        return self.render_chat(hidden, **kw), re.compile(f"\U000F0000{nonce}\\.(\\d+)\U000F0001")

    def _encode_rendered(self, text: str, unhide: re.Pattern | None) -> list[int]:
        """Ids of a rendered template: the special-token strings in it (the template's own, as the
        messages' were hidden) are control tokens; the text between them, with the hidden strings put
        back, is encoded as text — split where the backend itself splits around added tokens."""
        if self._split_re is None:
            return self.encode(text, add_bos=False)
        ids: list[int] = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:  # a control token the template wrote
                ids.append(self.backend.token_to_id(part if part in self._special_index else part.strip()))
            elif part:
                if unhide is not None:
                    part = unhide.sub(lambda m: self._specials[int(m.group(1))], part)
                ids += self._plain.encode(part, add_special_tokens=False).ids
        return ids

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
