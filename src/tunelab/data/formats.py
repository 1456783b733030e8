"""Row formats -> messages. Every error names the row's file and line.

A message is {"role": "system" | "user" | "assistant" | "tool", "content": str}, content non-empty, except that an
assistant message with "tool_calls" may have empty content; an assistant message may carry OpenAI's "weight": 0
(rendered, never trained: templates.render masks it) (tools.py describes tool calls and results). A
conversation's tool schemas ride along as `Conversation.tools`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import UserError
from .tools import check_tool_call, check_tools

if TYPE_CHECKING:
    from .readers import Row

Message = dict
ROLES = ("system", "user", "assistant", "tool")
# function_call / observation: LLaMA-Factory's tool turns (a JSON {"name", "arguments"} call, the tool's output)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool"}


class Conversation(list):
    """A list of messages, plus the JSON schemas of the tools the conversation may call (None: no tools)."""

    def __init__(self, messages=(), tools: list | None = None):
        super().__init__(messages)
        self.tools = tools
GEMINI_ROLES = {"user": "user", "model": "assistant"}


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]  # the response turns only
    rejected: list[Message]


@dataclass
class UnpairedRow:
    """One KTO example: a prompt, one completion, and whether the completion is desirable."""

    prompt: list[Message]
    completion: list[Message]  # the response turns only
    desirable: bool


@dataclass
class PromptRow:
    messages: list[Message]
    answer: Any | None


def to_messages(row: Row, fmt: str) -> list[Message] | str:
    """alpaca, chat, sharegpt, gemini and completion rows -> a conversation; text rows -> their text (data["text"]).

    Completion rows become [user(prompt), assistant(completion)]; build_sft_examples renders them with
    template "none" (plain concatenation) whatever data.template says.
    """
    if fmt == "alpaca":
        instruction, output = _field(row, "instruction", "alpaca"), _field(row, "output", "alpaca")
        extra, system = _optional(row, "input", "alpaca"), _optional(row, "system", "alpaca")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "chat":
        messages = _messages(row, _field(row, "messages", "chat", list), "messages")
    elif fmt == "sharegpt":
        turns = _field(row, "conversations", "sharegpt", list)
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
                got = t.get("from") if isinstance(t, dict) else t
                raise UserError(f"{row.where}: conversations[{i}] needs 'from' in {list(SHAREGPT_ROLES)}, got {got!r}")
        messages = _system(row) + _messages(row, turns, "conversations")  # LLaMA-Factory's optional "system"
    elif fmt == "gemini":
        messages = _gemini(row)
    elif fmt == "completion":
        prompt, completion = _field(row, "prompt", "completion"), _field(row, "completion", "completion")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "text":
        return _field(row, "text", "text")
    elif fmt in ("preference", "prompt", "kto"):
        raise UserError(f"{row.where}: format {fmt} rows are for methods dpo/orpo/kto/reward (preference), kto (kto) "
                        "or ppo/grpo (prompt), not for supervised training")
    else:
        raise UserError(f"{row.where}: unknown format {fmt!r}")
    _check_conversation(row, messages)
    return Conversation(messages, check_tools(row.where, row.data.get("tools")))


def to_preference(row: Row) -> PreferencePair:
    """A preference pair from any of the shapes tools ship:
    - {prompt, chosen, rejected}, each a string, one message or a list of messages (TRL, UltraFeedback);
    - {messages | conversations, chosen, rejected}: the prompt as a conversation, each reply one message or a
      list, messages either {role, content} or sharegpt {from, value} (LLaMA-Factory's dpo demo files);
    - {input: {messages}, preferred_output, non_preferred_output} (OpenAI preference fine-tuning);
    - without a prompt, chosen and rejected as whole dialogues (Anthropic hh-rlhf "\\n\\nHuman: ...\\n\\nAssistant:
      ..." strings, or message lists) whose shared turns up to the last differing assistant reply become the prompt.
    An optional top-level "system" string (LLaMA-Factory) opens the prompt."""
    names = ("preferred_output", "non_preferred_output") if "preferred_output" in row.data else ("chosen", "rejected")
    chosen = _field(row, names[0], "preference", (str, list, dict))
    rejected = _field(row, names[1], "preference", (str, list, dict))
    prompt_field = next((k for k in ("prompt", "messages", "conversations", "input") if k in row.data), None)
    if prompt_field is not None:
        raw = _field(row, prompt_field, "preference", (str, list, dict))
        if prompt_field == "input":
            if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list):
                raise UserError(f"{row.where}: 'input' must be an object with a 'messages' list (OpenAI preference rows)")
            raw, prompt_field = raw["messages"], "input.messages"
        prompt = _system(row) + _as_messages(row, raw, prompt_field, "user")
        chosen = _drop_prefix(_as_messages(row, chosen, names[0], "assistant"), prompt)
        rejected = _drop_prefix(_as_messages(row, rejected, names[1], "assistant"), prompt)
    else:
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise UserError(f"{row.where}: 'chosen' and 'rejected' must both be strings or both message lists")
        if isinstance(chosen, str):
            chosen, rejected = _parse_dialogue(row, chosen, "chosen"), _parse_dialogue(row, rejected, "rejected")
        else:
            chosen, rejected = _as_messages(row, chosen, "chosen", ""), _as_messages(row, rejected, "rejected", "")
        prompt, chosen, rejected = _split_shared_prompt(row, chosen, rejected)
        prompt = _system(row) + prompt
    if chosen == rejected:
        raise UserError(f"{row.where}: '{names[0]}' and '{names[1]}' are identical")
    if not prompt or prompt[-1]["role"] != "user":
        raise UserError(f"{row.where}: the prompt must end with a user message")
    for name, reply in zip(names, (chosen, rejected)):
        if not reply or reply[0]["role"] != "assistant":
            raise UserError(f"{row.where}: '{name}' must be a reply starting with an assistant message")
    return PreferencePair(prompt, chosen, rejected)


def to_unpaired(row: Row) -> UnpairedRow:
    """format kto rows: {messages | conversations, label} (LLaMA-Factory's kto demo; the completion is what follows
    the last user message) or {prompt, completion, label} (TRL's unpaired preference; each a string, one message or
    a list), with label true (desirable) or false (undesirable)."""
    label = row.data.get("label")
    if not isinstance(label, bool):
        raise UserError(f"{row.where}: kto row needs 'label': true (desirable) or false (undesirable), got {label!r}")
    if "prompt" in row.data or "completion" in row.data:
        prompt = _system(row) + _as_messages(row, _field(row, "prompt", "kto", (str, list, dict)), "prompt", "user")
        completion = _as_messages(row, _field(row, "completion", "kto", (str, list, dict)), "completion", "assistant")
        completion = _drop_prefix(completion, prompt)
    else:
        name = "conversations" if "conversations" in row.data else "messages"
        messages = _system(row) + _messages(row, _field(row, name, "kto", list), name)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise UserError(f"{row.where}: '{name}' has no user message to prompt with")
        prompt, completion = messages[: users[-1] + 1], messages[users[-1] + 1:]
    if not completion or completion[0]["role"] != "assistant":
        raise UserError(f"{row.where}: the completion must be a reply starting with an assistant message")
    if prompt[-1]["role"] != "user":
        raise UserError(f"{row.where}: the prompt must end with a user message")
    return UnpairedRow(prompt, completion, label)


def to_prompt(row: Row) -> PromptRow:
    """{prompt: str | messages} or {messages: [...]}, with an optional `answer` passed on to reward functions."""
    if "messages" in row.data:
        messages = _messages(row, _field(row, "messages", "prompt", list), "messages")
    else:
        messages = _as_messages(row, _field(row, "prompt", "prompt", (str, list)), "prompt", "user")
    if messages[-1]["role"] == "assistant":
        raise UserError(f"{row.where}: a prompt must not end with an assistant message")
    return PromptRow(messages, row.data.get("answer"))


def check_row(row: Row, fmt: str) -> None:
    """Raise UserError if the row does not fit its format."""
    if fmt == "preference":
        to_preference(row)
    elif fmt == "kto":
        to_unpaired(row)
    elif fmt == "prompt":
        to_prompt(row)
    else:
        to_messages(row, fmt)


# ---------------------------------------------------------------- helpers

def _field(row: Row, name: str, fmt: str, kind: type | tuple = str):
    if name not in row.data or row.data[name] is None:
        raise UserError(f"{row.where}: {fmt} row needs '{name}' (has: {', '.join(map(str, row.data)) or 'nothing'})")
    value = row.data[name]
    if not isinstance(value, kind):
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{row.where}: '{name}' must be a {want}, got {type(value).__name__}")
    if isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise UserError(f"{row.where}: '{name}' is empty")
    return value


def _optional(row: Row, name: str, fmt: str) -> str:
    value = row.data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{row.where}: '{name}' must be a string, got {type(value).__name__}")
    return value if value.strip() else ""


def _messages(row: Row, raw: list, name: str) -> list[Message]:
    """Messages as {role, content} (or sharegpt {from, value}) objects, checked; tool calls and results kept."""
    if not raw:
        raise UserError(f"{row.where}: '{name}' is empty")
    return [_message(row, m, f"{name}[{i}]") for i, m in enumerate(raw)]


def _message(row: Row, m, where: str) -> Message:
    if not isinstance(m, dict):
        raise UserError(f"{row.where}: {where} must be an object with role and content, got {type(m).__name__}")
    if "from" in m and "role" not in m:  # a sharegpt turn
        if m["from"] == "function_call":  # its value is the call: {"name": ..., "arguments": ...} as JSON
            return {"role": "assistant", "content": "",
                    "tool_calls": [check_tool_call(row.where, _json_value(row, m.get("value"), where), where)]}
        role, content = SHAREGPT_ROLES.get(m["from"], m["from"]), m.get("value")
    else:
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system message
    if role not in ROLES:
        raise UserError(f"{row.where}: {where} has role {role!r}; expected one of {', '.join(ROLES)}")
    calls = m.get("tool_calls") if role == "assistant" else None
    if calls is not None and (not isinstance(calls, list) or not calls):
        raise UserError(f"{row.where}: {where}.tool_calls must be a non-empty list of tool calls")
    if calls and content is None:
        content = ""
    if not isinstance(content, str) or not (content.strip() or calls):
        what = "empty" if isinstance(content, str) or content is None else type(content).__name__
        raise UserError(f"{row.where}: {where} ({role}) has {what} content; content must be a non-empty string")
    message = {"role": role, "content": content}
    if "weight" in m and role == "assistant":  # OpenAI's per-message loss switch: 0 = context only, 1 = trained
        if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
            raise UserError(f"{row.where}: {where}.weight must be 0 or 1, got {m['weight']!r}")
        message["weight"] = int(m["weight"])
    elif "weight" in m:
        raise UserError(f"{row.where}: {where}.weight is allowed on assistant messages only (role {role!r})")
    if calls:
        message["tool_calls"] = [check_tool_call(row.where, c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    if role == "tool":
        message.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
    return message


def _json_value(row: Row, value, where: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(f"{row.where}: {where} (function_call) value is not JSON: {e.msg} (column {e.colno})") from None


def _gemini(row: Row) -> list[Message]:
    """The managed service's tuning rows: {"contents": [{"role": "user" | "model", "parts": [{"text": ...}]}],
    optional "systemInstruction" (or "system_instruction") {"parts": [...]}}. A turn's text parts are
    concatenated as the service concatenates them. Tool use: a model turn's {"functionCall": {"name", "args"}}
    parts are its tool calls; a turn of {"functionResponse": {"name", "response"}} parts gives one tool result each
    (the response as JSON); the row's "tools": [{"functionDeclarations": [...]}] are the schemas."""
    contents = _field(row, "contents", "gemini", list)
    system = row.data.get("systemInstruction", row.data.get("system_instruction"))
    messages = []
    if system is not None:
        messages += _gemini_turn(row, system, "systemInstruction", "system")
    for i, turn in enumerate(contents):
        where = f"contents[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in GEMINI_ROLES:
            got = turn.get("role") if isinstance(turn, dict) else type(turn).__name__
            raise UserError(f"{row.where}: {where} needs 'role' in {list(GEMINI_ROLES)}, got {got!r}")
        messages += _gemini_turn(row, turn, where, GEMINI_ROLES[turn["role"]])
    return _messages(row, messages, "contents")


def _gemini_turn(row: Row, content, where: str, role: str) -> list[Message]:
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts:
        raise UserError(f"{row.where}: {where} needs a non-empty 'parts' list of {{\"text\": ...}} objects")
    texts, calls, results = [], [], []
    for j, part in enumerate(parts):
        part = part if isinstance(part, dict) else {}
        call = part.get("functionCall", part.get("function_call"))
        result = part.get("functionResponse", part.get("function_response"))
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(call, dict):
            calls.append({"function": {"name": call.get("name"), "arguments": call.get("args", {})}})
        elif isinstance(result, dict):
            results.append({"role": "tool", "content": json.dumps(result.get("response"), ensure_ascii=False),
                            **({"name": result["name"]} if isinstance(result.get("name"), str) else {})})
        else:
            keys = ", ".join(part) or "nothing"
            raise UserError(f"{row.where}: {where}.parts[{j}] needs a 'text' string, a 'functionCall' or a "
                            f"'functionResponse' (has: {keys})")
    if results:
        return results
    return [{"role": role, "content": "".join(texts), **({"tool_calls": calls} if calls else {})}]


def _check_conversation(row: Row, messages: list[Message]) -> None:
    """A supervised conversation needs a user turn before the first reply and at least one reply to learn."""
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in roles:
        raise UserError(f"{row.where}: conversation has no assistant message to train on")
    if roles[0] != "user":
        raise UserError(f"{row.where}: conversation must start with a user message (after any system message)")


def _as_messages(row: Row, value: str | list | dict, name: str, role: str) -> list[Message]:
    """A string (one message of `role`), one message object, or a list of them."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(row, [value] if isinstance(value, dict) else value, name)


def _system(row: Row) -> list[Message]:
    system = _optional(row, "system", "preference")
    return [{"role": "system", "content": system}] if system else []


def _drop_prefix(reply: list[Message], prompt: list[Message]) -> list[Message]:
    # Some datasets (e.g. UltraFeedback) repeat the prompt inside chosen/rejected
    return reply[len(prompt):] if reply[: len(prompt)] == prompt else reply


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _parse_dialogue(row: Row, text: str, name: str) -> list[Message]:
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise UserError(f"{row.where}: '{name}' is a string but not a '\\n\\nHuman: ... \\n\\nAssistant: ...' "
                        "dialogue; add a 'prompt' field for plain-string responses")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
             for who, said in zip(parts[1::2], parts[2::2])]
    return _messages(row, turns, name)


def _split_shared_prompt(row: Row, chosen: list[Message], rejected: list[Message]):
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:
        raise UserError(f"{row.where}: 'chosen' and 'rejected' are identical")
    while shared and chosen[shared - 1]["role"] != "user":  # the prompt ends where the assistant starts replying
        shared -= 1
    if not shared:
        raise UserError(f"{row.where}: 'chosen' and 'rejected' share no prompt (no common turns ending in a user turn)")
    return chosen[:shared], chosen[shared:], rejected[shared:]
