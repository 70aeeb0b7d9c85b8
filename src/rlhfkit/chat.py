"""Turning prompts and completions into token ids, one way for every stage.

train-rm, ppo and eval must score exactly the same token sequence for the same (prompt, completion),
so the rules live here:

* a prompt that is a string is used as is (with the tokenizer's BOS, if it adds one);
* a prompt that is a list of messages is rendered with the tokenizer's chat template and the
  generation prompt (``<|im_start|>assistant\\n``), so the model speaks next;
* a completion is encoded on its own (no special tokens) and appended to the prompt ids, and a
  completion that stopped ends with the EOS token, exactly as the policy generated it.

Tokenizers without a chat template get ChatML (the format of SmolLM2 and many others).
"""

from __future__ import annotations

from typing import Any

from rlhfkit.data.records import Conversation

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_prompt(tokenizer: Any, prompt: Conversation) -> str:
    """The text the model continues: the string itself, or the chat rendered up to the assistant's turn."""
    if isinstance(prompt, str):
        return prompt
    template = tokenizer.chat_template or CHATML_TEMPLATE
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, chat_template=template)


def render_messages(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A whole conversation as text (no generation prompt)."""
    template = tokenizer.chat_template or CHATML_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)


def encode_prompt(tokenizer: Any, prompt: Conversation) -> list[int]:
    text = render_prompt(tokenizer, prompt)
    # a rendered chat already holds its special tokens; a plain prompt gets the tokenizer's BOS
    return tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]


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
