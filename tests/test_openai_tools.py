"""protocols/openai/tools.py alone: tool_choice plans, the enforcing grammar's schema, hermes parsing whole
and streamed (content never shows a piece of `<tool_call>`)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from handlers.errors import InvalidInput
from protocols.openai.tools import StreamSplitter, parse_hermes, parse_output, plan_tools, template_messages

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {}}}}}
OTHER = {"type": "function", "function": {"name": "g"}}
TEXT = 'Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "g"}</tool_call>'


def test_plans_and_refusals() -> None:
    assert plan_tools(None, None).mode == "none"
    assert plan_tools([TOOL], None).mode == "auto"
    named = plan_tools([TOOL, OTHER], {"type": "function", "function": {"name": "g"}})
    assert (named.mode, named.name) == ("named", "g")
    assert json.loads(named.structured().spec) == {"type": "object"}  # type: ignore[union-attr]
    required = plan_tools([TOOL, OTHER], "required").structured()
    assert required is not None and required.kind == "json"
    schema = json.loads(required.spec)
    jsonschema.validate([{"name": "f", "parameters": {"x": 2}}, {"name": "g", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "h", "parameters": {}}], schema)
    for tools, choice, named_in_error in [
        ([TOOL], {"type": "function", "function": {"name": "nope"}}, "nope"),
        (None, "required", "needs 'tools'"),
        ([TOOL], "sometimes", "sometimes"),
        ([{"type": "function", "function": {}}], None, "name"),
    ]:
        with pytest.raises(InvalidInput, match=named_in_error):
            plan_tools(tools, choice)


def test_hermes_parsing_whole_and_streamed() -> None:
    content, calls = parse_hermes(TEXT)
    assert content == "Sure."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", {"x": 1}),
        ("g", {}),
    ]
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    for size in (1, 3, 7):
        splitter = StreamSplitter(plan_tools([TOOL, OTHER], "auto"))
        sent = "".join(splitter.feed(TEXT[i : i + size]) for i in range(0, len(TEXT), size))
        rest, streamed = splitter.finish()
        assert sent + rest == "Sure." and [c["index"] for c in streamed] == [0, 1]
    plain = StreamSplitter(plan_tools([TOOL], "auto"))
    sent = "".join(plain.feed(piece) for piece in ["a <", "tool", " b "])
    assert sent + plain.finish()[0] == "a <tool b "


def test_forced_outputs_and_template_messages() -> None:
    named = plan_tools([TOOL], {"type": "function", "function": {"name": "f"}})
    content, calls = parse_output(named, '{"x": 3}')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x": 3}'}
    assert parse_output(named, '{"x": ') == ('{"x": ', [])  # cut by max_tokens: left as content
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    assert template_messages(messages)[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
