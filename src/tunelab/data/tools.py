"""Tool calling: tool calls and tool results in conversations, rendered by the chat template or by the built-in tool
format, and parsed back out of generated text.

In a conversation (formats.py turns every data shape into this, OpenAI's):
  - an assistant message may carry "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}]
    (plus an "id"), with or without text content;
  - a tool result is {"role": "tool", "content": str} (plus "tool_call_id" / "name" when the data has them);
  - the row's "tools" are JSON schemas, {"type": "function", "function": {"name", "description", "parameters"}}.

Rendering (templates.render): a Jinja chat template that handles tools (it reads `tools` or `tool_calls`) gets the
messages and tools= exactly as transformers passes them to apply_chat_template. Every other template (the built-in
ones, and Jinja templates without tool support) gets the conversation in the built-in tool format below, as plain
messages. Either way tool calls are assistant text (trained) and tool results are not.

The built-in tool format (Hermes / Qwen 2.5 style, plain text, so any model can learn it):
  - the tools go at the end of the system message (one is added if there is none): TOOLS_INTRO, then
    <tools>, one JSON schema per line, </tools>, then TOOLS_OUTRO (how to call);
  - each tool call follows the assistant's text as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>;
  - each tool result becomes a user turn <tool_response>\n...\n</tool_response> (consecutive results: one turn).
`parse_tool_calls` reads calls back from generated text in this format, and in the two other common ones (a
"[TOOL_CALLS]" list, or a reply that is only a {"name", "arguments" | "parameters"} JSON object, as Llama 3 writes).
"""

from __future__ import annotations

import json
import re

from ..config import UserError

TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:")
TOOLS_OUTRO = ("For each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")
_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def template_handles_tools(template: str) -> bool:
    """Whether a Jinja chat template renders tools itself (built-in names never do)."""
    return ("{%" in template or "{{" in template) and ("tool_calls" in template or "tools" in template)


def has_tools(messages: list[dict], tools: list | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def as_text(messages: list[dict], tools: list | None) -> list[dict]:
    """The conversation in the built-in tool format: plain system / user / assistant messages."""
    out: list[dict] = []
    if tools:
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = f"{TOOLS_INTRO}\n<tools>\n{schemas}\n</tools>\n\n{TOOLS_OUTRO}"
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_result"):  # consecutive results share one user turn
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text, "tool_result": True})
        elif m.get("tool_calls"):
            calls = [_tagged(c["function"]) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or "", *calls]))})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _tagged(function: dict) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text without its tool calls, [{"name", "arguments"}]) from generated text; no calls: (text, [])."""
    calls = [c for c in (_json_call(m) for m in _TAGGED_CALL.findall(text)) if c]
    if calls:
        return _TAGGED_CALL.sub("", text).strip(), calls
    head, marker, tail = text.partition("[TOOL_CALLS]")
    if marker:
        try:
            listed = json.loads(tail.strip())
        except json.JSONDecodeError:
            listed = None
        listed = listed if isinstance(listed, list) else [listed]
        calls = [c for c in (_json_call(json.dumps(x)) for x in listed) if c]
        if calls:
            return head.strip(), calls
    call = _json_call(text.strip())
    return ("", [call]) if call else (text, [])


def _json_call(raw: str) -> dict | None:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "arguments": arguments} if isinstance(arguments, dict) else None


# ---------------------------------------------------------------- checking what the data gives

def check_tools(where: str, tools, name: str = "tools") -> list[dict] | None:
    """A row's tool schemas as OpenAI's {"type": "function", "function": {...}} list (bare {"name", ...} schemas
    are wrapped; a JSON string, as LLaMA-Factory stores them, is parsed), or None when the row has none."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: '{name}' is a string but not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(tools, list):
        raise UserError(f"{where}: '{name}' must be a list of function schemas, got {type(tools).__name__}")
    # Gemini groups its schemas: [{"functionDeclarations": [...]}]
    tools = [schema for tool in tools for schema in (
        tool.get("functionDeclarations", tool.get("function_declarations", [tool])) if isinstance(tool, dict)
        else [tool])]
    out = []
    for i, tool in enumerate(tools):
        schema = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise UserError(f"{where}: {name}[{i}] must be a function schema with a 'name' "
                            "({\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}})")
        out.append({"type": "function", "function": schema})
    return out


def check_tool_call(where: str, call, name: str) -> dict:
    """One tool call as {"type": "function", "function": {"name", "arguments": dict}} (+ "id"): OpenAI's shape
    ({"function": {...}}, arguments a JSON string or an object) or a bare {"name", "arguments"}."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise UserError(f"{where}: {name} must be a tool call with a function name "
                        "({\"function\": {\"name\": ..., \"arguments\": ...}})")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: {name} arguments are not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(arguments, dict):
        raise UserError(f"{where}: {name} arguments must be a JSON object, got {type(arguments).__name__}")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out
