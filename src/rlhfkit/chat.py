"""Turning prompts and completions into token ids, one way for every stage.

train-rm, ppo and eval must score exactly the same token sequence for the same (prompt, completion),
so the rules live here:

* a prompt that is a list of messages is rendered with the tokenizer's chat template and the
  generation prompt (``<|im_start|>assistant\\n``), so the model speaks next;
* a prompt that is a string depends on ``--chat-template`` (`ChatTemplate`, every stage that encodes
  prompts has it): ``auto`` (the default) renders it as one user turn, ``[{"role": "user",
  "content": prompt}]``, when the tokenizer has a chat template of its own, and uses it as is
  otherwise; ``always`` renders it even without one (ChatML); ``never`` uses it as is (with the
  tokenizer's BOS, if it adds one). A chat model fed raw text answers a prompt format nobody chats
  in (often with nothing at all), so ``auto`` says once on stderr that it renders string prompts;
* a completion is encoded on its own (no special tokens) and appended to the prompt ids, and a
  completion that stopped ends with the EOS token, exactly as the policy generated it.

A tokenizer without a chat template renders chats as ChatML (the format of SmolLM2 and many others).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import Any

from rlhfkit.config import ChatTemplate
from rlhfkit.data.records import Conversation

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer ships a chat template of its own (rlhfkit's ChatML fallback does not count)."""
    return bool(getattr(tokenizer, "chat_template", None))


def renders_as_chat(tokenizer: Any, prompt: Conversation, mode: ChatTemplate = "auto") -> bool:
    """Whether ``prompt`` goes through the chat template: a message list always; a string with
    ``--chat-template always``, or ``auto`` and a tokenizer that has a chat template."""
    if not isinstance(prompt, str):
        return True
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"chat template mode must be auto, always or never, got {mode!r}")
    return mode == "always" or (mode == "auto" and has_chat_template(tokenizer))


_noted: weakref.WeakSet = weakref.WeakSet()  # the tokenizers whose string prompts `render_prompt` has said it renders


def _note_rendering(tokenizer: Any) -> None:
    """The one line people read the first time ``auto`` renders a string prompt of a model (once per
    loaded tokenizer, so once per model and run)."""
    try:
        if tokenizer in _noted:
            return
        _noted.add(tokenizer)
    except TypeError:  # not weakly referenceable: say it every time rather than never
        pass
    name = str(getattr(tokenizer, "name_or_path", "") or "the model")
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 says it
        return
    from rlhfkit.console import console

    console.print(
        f"note: prompts are plain strings and {name} has a chat template: rendering them as user turns "
        "(--chat-template never keeps them raw)",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


def render_prompt(tokenizer: Any, prompt: Conversation, mode: ChatTemplate = "auto") -> str:
    """The text the model continues: the chat rendered up to the assistant's turn, or a string
    prompt as is (``mode``: see the module docstring).

    Example (the test tokenizer, whose template is ChatML): ``render_prompt(tok, "hi")`` and
    ``render_prompt(tok, [{"role": "user", "content": "hi"}])`` are both
    ``"<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n"``; with ``mode="never"`` the first is ``"hi"``.
    """
    if isinstance(prompt, str):
        if not renders_as_chat(tokenizer, prompt, mode):
            return prompt
        if mode == "auto":
            _note_rendering(tokenizer)
        prompt = [{"role": "user", "content": prompt}]
    template = tokenizer.chat_template or CHATML_TEMPLATE
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, chat_template=template)


def render_messages(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A whole conversation as text (no generation prompt)."""
    template = tokenizer.chat_template or CHATML_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)


def encode_prompt(tokenizer: Any, prompt: Conversation, mode: ChatTemplate = "auto") -> list[int]:
    """Prompt ids: `render_prompt`'s text, tokenized."""
    text = render_prompt(tokenizer, prompt, mode)
    # a rendered chat already holds its special tokens; a plain prompt gets the tokenizer's BOS
    return tokenizer(text, add_special_tokens=not renders_as_chat(tokenizer, prompt, mode))["input_ids"]


def encode_completion(tokenizer: Any, completion: Conversation, *, stopped: bool = True) -> list[int]:
    """Completion ids as the policy would have produced them: text tokens, then EOS if it stopped.

    A completion given as messages (conversational preference data) is its assistant turn(s)' text.
    """
    if isinstance(completion, list):
        completion = "".join(m["content"] for m in completion if m["role"] == "assistant")
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if stopped and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def stop_token_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for source in (getattr(model_config, "eos_token_id", None),):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


def check_prompts(
    tokenizer: Any,
    prompts: Sequence[Conversation],
    *,
    source: str,
    lines: Sequence[int],
    mode: ChatTemplate = "auto",
    context: int | None = None,
    max_new_tokens: int = 0,
    max_prompt_length: int = 0,
    hint: str = "",
) -> tuple[list[list[int]], int]:
    """Every prompt's ids, checked the same way by every stage that samples (collect, ppo, eval):
    a prompt that the tokenizer or its chat template rejects, one that encodes to no tokens, and
    one that leaves no room for ``max_new_tokens`` in the model's ``context`` are each a
    DataError at ``source:LINE`` (``hint`` is added to the last: how to shorten prompts). With
    ``max_prompt_length`` a longer prompt keeps its last N tokens, and is counted: returns
    (ids per prompt, number truncated)."""
    from rlhfkit.errors import DataError

    out, truncated = [], 0
    for prompt, line in zip(prompts, lines, strict=True):
        try:
            ids = encode_prompt(tokenizer, prompt, mode)
        except Exception as e:  # a template that refuses the roles, text a (slow) tokenizer cannot encode
            raise DataError(source, line, "prompt", f"the tokenizer rejects it ({type(e).__name__}: {str(e)[:120]})") from e
        if not ids:
            raise DataError(source, line, "prompt", "encodes to no tokens")
        if max_prompt_length and len(ids) > max_prompt_length:
            ids, truncated = ids[-max_prompt_length:], truncated + 1  # keep the end: the model continues it
        if context is not None and len(ids) + max_new_tokens > context:
            reason = f"{len(ids)} tokens + --max-new-tokens {max_new_tokens} do not fit the model's context of {context} tokens"
            raise DataError(source, line, "prompt", reason + (f" ({hint})" if hint else ""))
        out.append(ids)
    return out, truncated
