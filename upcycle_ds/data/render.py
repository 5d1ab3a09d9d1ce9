"""Canonical samples (formats.py) -> text plus the character spans that carry loss.

- `Chat`: ``tokenizer.apply_chat_template``. Loss on each assistant turn's content and the end-of-turn text the
  template puts after it (e.g. ``</s>``, ``<|im_end|>``), nothing else; with ``turns="last"`` only on the last
  assistant turn (seed-data scores the final answer).
- `Pair`: with ``prompt_format="auto"`` a one-turn user/assistant chat when the tokenizer has a chat template
  (instruct models), else plain ``prompt + response`` with the tokenizer's own special tokens (e.g. Llama's BOS)
  followed by the EOS id; loss on the response (+ end of turn / EOS). ``"chat"``/``"plain"`` force one rendering.
- `Text`: loss on every character, EOS appended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .formats import Chat, Pair, RowError, Sample, Text

PromptFormat = Literal["auto", "chat", "plain"]
Turns = Literal["all", "last"]


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]
    """Character [start, end) ranges that carry loss: sorted, disjoint."""
    add_special_tokens: bool
    """Let the tokenizer add its BOS etc. (plain text); chat templates write their own."""
    append_eos: bool
    """Append the EOS id after tokenizing (labelled)."""


def _chat(tokenizer, messages, **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def render_messages(tokenizer, messages: list[dict], turns: Turns = "all") -> Rendered:
    """Chat rendering; loss spans = assistant contents + the end-of-turn text the template puts after each.

    An assistant turn starts where the rendering of the conversation before it (with the generation prompt) ends;
    its content is searched from there (templates may insert e.g. empty think blocks), and the template's suffix
    after the content (from rendering the conversation up to that turn) is labelled too if it follows in the full
    text. This works for templates that are not prefix-stable (Qwen3 drops think blocks of earlier turns).
    """
    full = _chat(tokenizer, messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        start = cursor
        if i > 0:
            prefix = _chat(tokenizer, messages[:i], add_generation_prompt=True)
            if full.startswith(prefix):
                start = max(start, len(prefix))
        pos, text = full.find(content, start), content
        if pos < 0 and content.strip():
            text = content.strip()
            pos = full.find(text, start)
        if pos < 0:
            raise RowError(f"the chat template does not render assistant turn {i}'s content verbatim")
        end = pos + len(text)
        upto = full if i == len(messages) - 1 else _chat(tokenizer, messages[: i + 1])
        k = upto.rfind(text) if text else len(upto)
        suffix = upto[k + len(text):] if k >= 0 else ""
        if suffix and full.startswith(suffix, end):
            end += len(suffix)
        if end > pos:
            spans.append((pos, end))
        cursor = end
    if turns == "last":
        spans = spans[-1:]
    return Rendered(full, spans, add_special_tokens=False, append_eos=False)


def render(sample: Sample, tokenizer, prompt_format: PromptFormat = "auto", turns: Turns = "all") -> Rendered:
    """Text + loss spans of a Chat / Pair / Text sample (Tokens samples need no rendering)."""
    if isinstance(sample, Chat):
        if not tokenizer.chat_template:
            raise RowError("row is a chat but the tokenizer has no chat template")
        return render_messages(tokenizer, sample.messages, turns)
    if isinstance(sample, Pair):
        chat = prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))
        if chat:
            if not tokenizer.chat_template:
                raise RowError("prompt_format='chat' but the tokenizer has no chat template")
            return render_messages(tokenizer, [{"role": "user", "content": sample.prompt},
                                               {"role": "assistant", "content": sample.response}], turns)
        n = len(sample.prompt)
        return Rendered(sample.prompt + sample.response, [(n, n + len(sample.response))], True, True)
    if isinstance(sample, Text):
        return Rendered(sample.text, [(0, len(sample.text))], True, True)
    raise TypeError(f"cannot render {type(sample).__name__}")
