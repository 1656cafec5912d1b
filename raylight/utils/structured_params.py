"""What a request asks its output to match (vLLM's `structured_outputs` names): a JSON schema, any
JSON object, a regex, one of a list of strings, or an EBNF grammar. Plain data, checked when built
(shape and size only: whether a schema or regex compiles is the compile service's question, answered
off the step loop, see raylight/structured/compiler.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

# A spec's text is bounded before anything compiles it: a big schema is not a reason to spend seconds.
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 256


@dataclass
class StructuredOutputsParams:
    json: Union[None, str, dict] = None  # a JSON schema (object or its text)
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None  # EBNF (xgrammar's dialect, GBNF-like), root rule `root`
    json_object: bool = False  # any JSON object
    disable_any_whitespace: bool = False  # JSON without free whitespace (compact, as json.dumps(separators=(",", ":"))
    # The request field this came from, named by errors ("response_format", "tools", "structured_outputs"...).
    source: str = "structured_outputs"

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(f"{self.source}: give exactly one of json, regex, choice, grammar or json_object, "
                             f"got {kinds or 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    parsed = json.loads(self.json)
                except ValueError:
                    raise ValueError(f"{self.source}: the JSON schema is not valid JSON") from None
            else:
                parsed = self.json
            if not isinstance(parsed, dict):
                raise ValueError(f"{self.source}: a JSON schema must be an object, got {type(parsed).__name__}")
            text = self.json if isinstance(self.json, str) else json.dumps(self.json, ensure_ascii=False)
        elif self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice or len(self.choice) > MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"{self.source}: choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
            text = "".join(self.choice)
        elif self.json_object:
            text = ""
        else:
            text = self.regex if self.regex is not None else self.grammar
            if not isinstance(text, str) or not text:
                raise ValueError(f"{self.source}: {kinds[0]} must be a non-empty string")
        if len(text) > MAX_SPEC_CHARS:
            raise ValueError(f"{self.source}: the {kinds[0]} is {len(text)} characters long, over the "
                             f"{MAX_SPEC_CHARS} allowed")

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar (the compile cache's key)."""
        kind = self.kind
        if kind == "json":
            text = self.json if isinstance(self.json, str) else json.dumps(self.json, ensure_ascii=False)
        elif kind == "choice":
            text = "\x00".join(self.choice)
        elif kind == "json_object":
            text = ""
        else:
            text = getattr(self, kind)
        return kind, text, self.disable_any_whitespace

    @classmethod
    def from_dict(cls, value: Any, source: str = "structured_outputs") -> "StructuredOutputsParams":
        """vLLM's `structured_outputs` request object: {"json": ...} | {"regex": ...} | {"choice": [...]} |
        {"grammar": ...} | {"json_object": true}, with optional "disable_any_whitespace"."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{source} must be an object")
        known = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"}
        unknown = sorted(set(value) - known - {"whitespace_pattern", "structural_tag"})
        if unknown or value.get("structural_tag") is not None or value.get("whitespace_pattern") is not None:
            bad = unknown or [k for k in ("structural_tag", "whitespace_pattern") if value.get(k) is not None]
            raise ValueError(f"{source}: {', '.join(bad)} is not supported")
        for flag in ("json_object", "disable_any_whitespace"):
            if value.get(flag) is not None and not isinstance(value[flag], bool):
                raise ValueError(f"{source}: {flag} must be a boolean")
        return cls(json=value.get("json"), regex=value.get("regex"), choice=value.get("choice"),
                   grammar=value.get("grammar"), json_object=bool(value.get("json_object")),
                   disable_any_whitespace=bool(value.get("disable_any_whitespace")), source=source)
