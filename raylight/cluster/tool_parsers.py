"""Tool calling on chat completions: what `tools` and `tool_choice` turn into, and the parsers that
read tool calls out of the model's text (vLLM's `tool_call_parser` names).

* `tool_choice` "none": the tools are not rendered and nothing is parsed.
* "auto": the model's chat template renders the tools; the server's parser (config
  `tool_call_parser`) reads calls out of the output; text that does not parse stays content.
* "required" and a named function: the output is constrained by a JSON-schema grammar, so the
  arguments always parse: a named function's arguments object itself; "required" a JSON array of
  {"name", "parameters"} objects, one schema per tool (vLLM does the same).

Parsers scan with str.find and json's raw_decode (linear in the text; no backtracking regexes,
CVE-2025-48887). A template that does not render `tools` (SmolLM2's) gets them in a system message
in the parser's own format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from raylight.utils.structured_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_DECODER = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)

    def openai(self, index: Optional[int] = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out = {"index": index, **out}
        return out


# ---------------------------------------------------------------- request side

def check_tools(tools: Optional[list], tool_choice: Any) -> tuple[str, Optional[str]]:
    """Validates `tools` / `tool_choice` (ValueError naming the field); returns the mode ("none",
    "auto", "required" or "named") and the named function."""
    tools = tools or []
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools.{i}: must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"tools.{i}.function.name must be 1 to 64 letters, digits, '_', '-' or '.'")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools.{i}.function.parameters must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ValueError(f"tools.{i}.function.description must be a string")
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError("tools: function names must be unique")
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice {tool_choice!r} needs tools")
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and \
            isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        return "named", name
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                     "{\"name\": ...}}")


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tool_grammar(tools: list[dict], mode: str, name: Optional[str], parallel: bool) -> StructuredOutputsParams:
    """The output constraint of tool_choice "required" or a named function."""
    if mode == "named":
        tool = next(t for t in tools if t["function"]["name"] == name)
        return StructuredOutputsParams(json=_parameters(tool), source="tools")
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                       "parameters": _parameters(t)},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}
    schema = {"type": "array", "items": one, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema, source="tools")


def calls_from_guided(text: str, mode: str, name: Optional[str]) -> list[ToolCall]:
    """The tool calls of a "required" / named output (JSON by construction, unless cut by max_tokens)."""
    if mode == "named":
        return [ToolCall(name, text)]
    start = text.find("[")
    items = _array_items(text, start + 1) if start >= 0 else []  # the complete ones, if max_tokens cut it
    return [ToolCall(it["name"], json.dumps(it.get("parameters", {}), ensure_ascii=False))
            for it in items if isinstance(it, dict) and isinstance(it.get("name"), str)]


def template_renders_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def conversation_with_tools(conversation: list[dict], tools: list[dict], parser: "ToolParser",
                            native: bool) -> list[dict]:
    """For a template that does not render tools (`native` False): the tools in a system message and
    earlier assistant tool calls as text, both in the parser's format. Otherwise as given."""
    if native:
        return conversation
    out = []
    for m in conversation:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            text = "".join(parser.format_call(c["function"]["name"], c["function"].get("arguments", {}))
                           for c in m["tool_calls"] if isinstance(c, dict) and "function" in c)
            m = {**m, "content": (m.get("content") or "") + text}
            m.pop("tool_calls")
        out.append(m)
    prompt = parser.system_prompt([t["function"] for t in tools])
    if out and out[0].get("role") == "system":
        return [{**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}] + out[1:]
    return [{"role": "system", "content": prompt}] + out


# ---------------------------------------------------------------- parsers

class ToolParser:
    name = ""

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """(content, tool calls) of a whole output; text that does not parse stays content."""
        raise NotImplementedError

    def system_prompt(self, functions: list[dict]) -> str:
        raise NotImplementedError

    def format_call(self, name: str, arguments: Any) -> str:
        raise NotImplementedError


def _call_of(obj: Any) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _as_dict(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


class HermesToolParser(ToolParser):
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number; text before the first is content."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def blocks(self, text: str, final: bool) -> tuple[int, list[tuple[int, str]], bool]:
        """(where the calls start, [(end of block, its JSON text)] complete so far, whether every block
        seen is complete). With `final`, an unterminated last block counts when it parses."""
        first = text.find(self.start)
        if first < 0:
            return len(text), [], True
        out, pos = [], first
        while True:
            s = text.find(self.start, pos)
            if s < 0:
                return first, out, True
            e = text.find(self.end, s)
            if e < 0:
                if final:
                    out.append((len(text), text[s + len(self.start):]))
                return first, out, final
            out.append((e + len(self.end), text[s + len(self.start):e]))
            pos = e + len(self.end)

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        first, blocks, _ = self.blocks(text, final=True)
        calls = []
        for _, body in blocks:
            try:
                call = _call_of(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                return text, []  # not a well-formed call: plain text
            calls.append(call)
        if not calls:
            return text, []
        content = text[:first].strip()
        return (content or None), calls

    def system_prompt(self, functions: list[dict]) -> str:
        sigs = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
        return ("You are a function calling AI model. You may call one or more functions to assist with the user "
                "query. Here are the available functions, as JSON signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{sigs}\n</tools>\nFor each function call, return a JSON object with the function name "
                "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

    def format_call(self, name: str, arguments: Any) -> str:
        body = json.dumps({"name": name, "arguments": _as_dict(arguments)}, ensure_ascii=False)
        return f"<tool_call>\n{body}\n</tool_call>"


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls: the output is {"name": ..., "parameters": {...}} (optionally after
    <|python_tag|>), several separated by ';'. Output not starting with '{' is content."""

    name = "llama3_json"
    tag = "<|python_tag|>"

    def _body(self, text: str) -> Optional[int]:
        i = len(text) - len(text.lstrip())
        if text.startswith(self.tag, i):
            i += len(self.tag)
            i += len(text[i:]) - len(text[i:].lstrip())
        return i if text.startswith("{", i) else None

    def objects(self, text: str, start: int) -> tuple[list[tuple[int, Any]], int]:
        """Complete JSON values from `start`, separated by ';' and whitespace: [(end, value)], and where
        parsing stopped."""
        out, pos, n = [], start, len(text)
        while pos < n:
            while pos < n and text[pos] in " \t\r\n;":
                pos += 1
            if pos >= n:
                break
            try:
                obj, end = _DECODER.raw_decode(text, pos)
            except ValueError:
                break
            out.append((end, obj))
            pos = end
        return out, pos

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        start = self._body(text)
        if start is None:
            return text, []
        objs, pos = self.objects(text, start)
        calls = [_call_of(o) for _, o in objs]
        if not calls or any(c is None for c in calls) or text[pos:].strip():
            return text, []
        return None, calls

    def system_prompt(self, functions: list[dict]) -> str:
        sigs = "\n\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
        return ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\nRespond in the format "
                '{"name": function name, "parameters": dictionary of argument name and its value}. Do not use '
                f"variables.\n\n{sigs}")

    def format_call(self, name: str, arguments: Any) -> str:
        return json.dumps({"name": name, "parameters": _as_dict(arguments)}, ensure_ascii=False)


PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def get_parser(name: Optional[str]) -> Optional[ToolParser]:
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got {name!r}")
    return PARSERS[name]()


# ---------------------------------------------------------------- streaming

class ToolCallStream:
    """One choice's streamed text -> content deltas and OpenAI `tool_calls` deltas.

    auto: content streams as it comes, holding back what could be the start of a tool call; each
    call is sent whole (id, name and its arguments in one delta) once its text is complete.
    named: the id and name first, then the arguments as they are generated. required: each
    element of the JSON array once complete."""

    def __init__(self, mode: str, parser: Optional[ToolParser] = None, name: Optional[str] = None):
        self.mode, self.parser, self.name = mode, parser, name
        self.text = ""
        self.sent_content = 0  # characters of content already sent
        self.calls: list[ToolCall] = []
        self.sent_args = 0  # named: characters of arguments already sent
        self._failed = False  # auto: the calls did not parse: everything is content

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def feed(self, delta: str, final: bool) -> tuple[str, list[dict]]:
        """Returns (content delta, tool_calls deltas) for this piece of text."""
        self.text += delta
        if self.mode == "named":
            return self._named(final)
        if self.mode == "required":
            return "", self._required(final)
        if self.mode == "auto" and self.parser is not None and not self._failed:
            return self._auto(final)
        return self._content(len(self.text)), []

    def _content(self, upto: int) -> str:
        out = self.text[self.sent_content:upto] if upto > self.sent_content else ""
        self.sent_content = max(self.sent_content, upto)
        return out

    def _named(self, final: bool) -> tuple[str, list[dict]]:
        deltas = []
        if not self.calls and (self.text or final):
            self.calls.append(ToolCall(self.name, ""))
            deltas.append({"index": 0, "id": self.calls[0].id, "type": "function",
                           "function": {"name": self.name, "arguments": ""}})
        piece = self.text[self.sent_args:]
        if piece:
            self.sent_args = len(self.text)
            self.calls[0].arguments = self.text
            deltas.append({"index": 0, "function": {"arguments": piece}})
        return "", deltas

    def _required(self, final: bool) -> list[dict]:
        start = self.text.find("[")
        if start < 0:
            return []
        objs = _array_items(self.text, start + 1)
        out = []
        for obj in objs[len(self.calls):]:
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                call = ToolCall(obj["name"], json.dumps(obj.get("parameters", {}), ensure_ascii=False))
                self.calls.append(call)
                out.append(call.openai(len(self.calls) - 1))
        return out

    def _auto(self, final: bool) -> tuple[str, list[dict]]:
        p = self.parser
        if isinstance(p, HermesToolParser):
            first, blocks, _ = p.blocks(self.text, final)
            if first == len(self.text):  # no call yet: hold back a possible partial "<tool_call>"
                hold = 0 if final else _partial_suffix(self.text, p.start)
                return self._content(len(self.text) - hold), []
            content = self._content(first)
            out = []
            for _, body in blocks[len(self.calls):]:
                try:
                    call = _call_of(json.loads(body))
                except ValueError:
                    call = None
                if call is None:
                    return self._give_up(content)
                self.calls.append(call)
                out.append(call.openai(len(self.calls) - 1))
            if final and not self.calls:
                return self._give_up(content)
            return content, out
        # llama3_json: a call starts the output, else it is all content
        stripped = self.text.lstrip()
        if not stripped or (not final and Llama3JsonToolParser.tag.startswith(stripped)):
            return "", []
        start = p._body(self.text)
        if start is None:
            self._failed = not self.calls
            return self._content(len(self.text)), []
        objs, pos = p.objects(self.text, start)
        out = []
        for _, obj in objs[len(self.calls):]:
            call = _call_of(obj)
            if call is None:
                return self._give_up("")
            self.calls.append(call)
            out.append(call.openai(len(self.calls) - 1))
        if final and (not self.calls or self.text[pos:].strip()):
            return self._give_up("")
        return "", out

    def _give_up(self, content: str) -> tuple[str, list[dict]]:
        """The tool-call text did not parse: it is sent as content (calls already sent stay sent)."""
        self._failed = True
        return content + self._content(len(self.text)), []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _array_items(text: str, pos: int) -> list[Any]:
    """Complete items of a JSON array whose '[' ends just before `pos` (stops at a partial item)."""
    out, n = [], len(text)
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            break
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            break
        out.append(obj)
    return out
