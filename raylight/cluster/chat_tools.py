"""Tools on one chat completion request: what goes into the chat template, and the response (whole or
streamed) rewritten into OpenAI's `tool_calls` shape. The ingress calls three things: `ChatTools.of`
(validates; a 400 on a bad combination), `template_conversation` / `template_kwargs` (what the
template renders), and `rewrite` or `wrap_stream` on its ordinary response."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Optional

from raylight.cluster.protocol import APIError
from raylight.cluster.tool_parsers import (HermesToolParser, ToolCallStream, ToolParser, calls_from_guided,
                                           conversation_with_tools, template_renders_tools)


class ChatTools:
    def __init__(self, mode: str, name: Optional[str], tools: list[dict], parser: Optional[ToolParser],
                 native: bool):
        self.mode, self.name, self.tools, self.parser, self.native = mode, name, tools, parser, native

    @classmethod
    def of(cls, body, parser: Optional[ToolParser], tokenizer) -> "ChatTools":
        mode, name = body.tool_mode()
        if mode == "auto" and parser is None:
            raise APIError(400, "tool_choice 'auto' (the default with tools) needs a tool-call parser: start the "
                           "server with tool_call_parser (--tool-call-parser hermes|llama3_json), or pass "
                           "tool_choice 'required', 'none' or a named function", param="tool_choice")
        return cls(mode, name, list(body.tools or []), parser, template_renders_tools(tokenizer))

    @property
    def active(self) -> bool:
        return self.mode != "none"

    # ---- the prompt ----
    def template_conversation(self, conversation: list[dict]) -> list[dict]:
        if not self.active:
            return conversation
        return conversation_with_tools(conversation, self.tools, self.parser or HermesToolParser(), self.native)

    def template_kwargs(self, kwargs: Optional[dict]) -> Optional[dict]:
        if not self.active or not self.native:
            return kwargs
        return {**(kwargs or {}), "tools": self.tools}

    # ---- the response ----
    def _message(self, text: str, finish_reason: Optional[str]) -> tuple[dict, Optional[str]]:
        if self.mode in ("named", "required"):
            calls, content = calls_from_guided(text, self.mode, self.name), None
            if not calls:
                content = text
        else:
            content, calls = self.parser.extract(text)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [c.openai() for c in calls]
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        return msg, finish_reason

    def rewrite(self, response: dict) -> dict:
        """A non-streamed chat.completion with its choices' tool calls parsed out of their text."""
        if not self.active:
            return response
        for choice in response.get("choices", []):
            text = choice["message"].get("content") or ""
            msg, choice["finish_reason"] = self._message(text, choice.get("finish_reason"))
            choice["message"] = {**choice["message"], **msg}
        return response

    def wrap_stream(self, response):
        """The streamed response with each choice's content deltas turned into content and `tool_calls` deltas."""
        if self.active:
            response.body_iterator = self._events(response.body_iterator)
        return response

    async def _events(self, events: AsyncIterator) -> AsyncIterator[str]:
        streams: dict[int, ToolCallStream] = {}
        async for event in events:
            text = event.decode() if isinstance(event, bytes) else event
            if not text.startswith("data: {"):
                yield event
                continue
            body = json.loads(text[len("data: "):])
            if "choices" not in body or "error" in body:
                yield event
                continue
            choices = []
            for ch in body["choices"]:
                delta = ch.get("delta")
                if delta is None:
                    choices.append(ch)
                    continue
                st = streams.get(ch["index"])
                if st is None:
                    st = streams[ch["index"]] = ToolCallStream(self.mode, self.parser, self.name)
                final = ch.get("finish_reason") is not None
                content, calls = st.feed(delta.get("content") or "", final)
                new = {k: v for k, v in delta.items() if k not in ("content", "tool_calls")}
                if content or ("role" in delta):
                    new["content"] = content
                if calls:
                    new["tool_calls"] = calls
                if final and st.called and ch["finish_reason"] == "stop":
                    ch = {**ch, "finish_reason": "tool_calls"}
                if new or final:
                    choices.append({**ch, "delta": new})
            if choices or not body["choices"]:
                yield f"data: {json.dumps({**body, 'choices': choices}, ensure_ascii=False)}\n\n"
