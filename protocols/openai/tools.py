"""Tool calling for chat (no torch): tool_choice modes, the grammar that enforces `required` and named
choices, and parsing of the model's output into OpenAI `tool_calls`, whole or streamed.

- `none`: tools are rendered by the chat template (as vLLM does) and the output is plain content.
- `auto`: the output is parsed in the hermes format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  (Qwen, Hermes, SmolLM3 ... templates ask for it); text before the first call is the content.
- `required`: the output is forced, by grammar, to a JSON array of `{"name", "parameters"}` objects, one of
  the tools each (vLLM's method); `named` ({"type": "function", "function": {"name": N}}): forced to a JSON
  object valid for N's parameters, which becomes that call's arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from engines.generation.backend import StructuredOutput
from handlers.errors import InvalidInput

Mode = Literal["none", "auto", "required", "named"]
START, END = "<tool_call>", "</tool_call>"
_HERMES = re.compile(re.escape(START) + r"\s*(.*?)\s*(?:" + re.escape(END) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    mode: Mode
    tools: tuple[dict[str, Any], ...] = ()
    name: str | None = None  # the named tool

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def structured(self) -> StructuredOutput | None:
        """The grammar that enforces `required` and named choices (None otherwise)."""
        if self.mode == "named":
            return StructuredOutput("json", json.dumps(_parameters(self._tool(self.name))))
        if self.mode == "required":
            options = [
                {
                    "type": "object",
                    "properties": {"name": {"const": _name(tool)}, "parameters": _parameters(tool)},
                    "required": ["name", "parameters"],
                }
                for tool in self.tools
            ]
            return StructuredOutput("json", json.dumps({"type": "array", "minItems": 1, "items": {"anyOf": options}}))
        return None

    def _tool(self, name: str | None) -> dict[str, Any]:
        return next(tool for tool in self.tools if _name(tool) == name)


def _name(tool: dict[str, Any]) -> str:
    return str(tool["function"]["name"])


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    parameters = tool["function"].get("parameters")
    return parameters if isinstance(parameters, dict) and parameters else {"type": "object"}


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolPlan:
    """Checks tools and tool_choice (400 by name) and says how to serve them."""
    tools = tools or []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidInput(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param="tools")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidInput(f"tools[{i}].function has no 'name'", param="tools")
        if "parameters" in function and not isinstance(function["parameters"], dict | None):
            raise InvalidInput(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
    names = [str(tool["function"]["name"]) for tool in tools]
    if tool_choice is None:
        return ToolPlan("auto" if tools else "none", tuple(tools))
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidInput(
                "'tool_choice' must be none, auto, required or {'type': 'function', 'function': {'name': ...}}",
                param="tool_choice",
            )
        if name not in names:
            raise InvalidInput(f"'tool_choice' names '{name}', which is not among the tools", param="tool_choice")
        return ToolPlan("named", tuple(tools), name)
    if tool_choice not in ("none", "auto", "required"):
        raise InvalidInput(f"'tool_choice' '{tool_choice}' is not none, auto or required", param="tool_choice")
    if tool_choice != "none" and not tools:
        raise InvalidInput(f"'tool_choice' '{tool_choice}' needs 'tools'", param="tool_choice")
    return ToolPlan(tool_choice, tuple(tools))  # type: ignore[arg-type]


def tool_call(name: str, arguments: Any, index: int | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
    }
    if index is not None:
        call = {"index": index, **call}
    return call


def parse_hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content before the first call or None, calls); text with no well-formed call stays content."""
    calls = []
    for match in _HERMES.finditer(text):
        try:
            parsed = json.loads(match.group(1))
        except ValueError:
            return text, []
        if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
            return text, []
        calls.append(tool_call(parsed["name"], parsed.get("arguments", parsed.get("parameters", {}))))
    if not calls:
        return text, []
    content = text[: text.index(START)].strip()
    return content or None, calls


def parse_output(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of one finished choice."""
    if plan.mode == "auto":
        return parse_hermes(text)
    if not plan.forced:
        return text, []
    try:
        parsed = json.loads(text)
    except ValueError:  # cut by max_tokens before the grammar completed
        return text, []
    if plan.mode == "named":
        return None, [tool_call(str(plan.name), parsed)]
    return None, [tool_call(str(item["name"]), item["parameters"]) for item in parsed]


def finish_reason(plan: ToolPlan, calls: list[dict[str, Any]], reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (auto, required); a named call ends with "stop"."""
    if calls and plan.mode in ("auto", "required"):
        return "tool_calls"
    return reason


class StreamSplitter:
    """Streams content while holding back what may start a tool call; the calls come at the end."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0
        self.in_call = plan.forced

    def feed(self, delta: str) -> str:
        """Content safe to send now."""
        self.text += delta
        if self.in_call:
            return ""
        start = self.text.find(START, self.sent)
        if start >= 0:  # the content ends here, without the whitespace before the call (as parse_hermes)
            self.in_call = True
            out, self.sent = self.text[self.sent : start].rstrip(), start
            return out
        hold = 0
        for k in range(min(len(START) - 1, len(self.text) - self.sent), 0, -1):
            if self.text.endswith(START[:k]):
                hold = k
                break
        end = len(self.text) - hold
        while end > self.sent and self.text[end - 1].isspace():  # may be the space before a call
            end -= 1
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, calls) once the choice is done."""
        _, calls = parse_output(self.plan, self.text)
        if calls:  # the content before the call was sent by feed()
            return "", [{"index": i, **call} for i, call in enumerate(calls)]
        return self.text[self.sent :], []


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool_calls with JSON-text arguments turned into objects, as chat templates expect."""
    result = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            converted = []
            for call in calls:
                function = dict(call.get("function") or {}) if isinstance(call, dict) else {}
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        raise InvalidInput("a tool call's 'arguments' is not JSON", param="messages") from None
                converted.append({**call, "function": function})
            message = {**message, "tool_calls": converted}
        result.append(message)
    return result
