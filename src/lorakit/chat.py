"""Chat rendering, one place for training and serving: message lists -> the model's chat-template text.

A tokenizer without a chat template gets a plain `<|role|>` layout. Training splits a rendered conversation
into prompt and response segments (loss on the responses); serving and generation render the prompt that asks
for the next assistant turn.
"""

from __future__ import annotations

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def check_messages(messages, name: str = "messages") -> list[dict]:
    """`messages` itself when it is a non-empty list of {role: system/user/assistant, content: string}; a
    ValueError naming `name` (a training row's field) otherwise."""
    where = "" if name == "messages" else f" in {name}"
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{name} must be a non-empty list" + (" of messages" if where else ""))
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"each message{where} needs role system/user/assistant and string content, got {m!r}")
    return messages


def chat_messages(row: dict) -> list[dict]:
    if "messages" in row:
        messages = row["messages"]
    else:
        messages = [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
                    for m in row["conversations"] if isinstance(m, dict)]
    check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant message to learn from")
    return messages



def render_prompt(messages: list[dict], tokenizer) -> str:
    """The text that asks the model for its next assistant turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"



def render_conversation(messages: list[dict], tokenizer) -> str:
    """The whole conversation as the chat template renders it (each assistant turn closed)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "".join(f"<|{m['role']}|>\n{m['content']}\n{tokenizer.eos_token or ''}" if m["role"] == "assistant"
                   else f"<|{m['role']}|>\n{m['content']}\n" for m in messages)



def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split the templated conversation into prompt/response segments by rendering prefixes."""
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(messages[:i], tokenizer)
        full = render_conversation(messages[: i + 1], tokenizer)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations as growing prefixes; "
                             "use train_on_prompt=True for this tokenizer")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments
