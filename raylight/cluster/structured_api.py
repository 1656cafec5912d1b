"""The OpenAI and vLLM request fields that constrain the output, turned into one
`StructuredOutputsParams`: `response_format` ({"type": "text" | "json_object" | "json_schema"}),
vLLM's `structured_outputs` object (json, regex, choice, grammar, json_object) and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields. Errors are ValueErrors
that name the field (a 400); whether a schema or regex compiles is decided by the engine replica's
compile service, within its time cap (also a 400)."""

from __future__ import annotations

from typing import Any, Optional

from raylight.utils.structured_params import StructuredOutputsParams

STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")


def check_field(name: str, value: Any) -> Any:
    """Shape of one field, checked when the body is parsed (the pydantic validator's body)."""
    if value is None:
        return None
    spec_of(name, value)
    return value


def spec_of(name: str, value: Any) -> Optional[StructuredOutputsParams]:
    if name == "response_format":
        if not isinstance(value, dict):
            raise ValueError("response_format must be an object with a type")
        kind = value.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True, source="response_format")
        if kind == "json_schema":
            js = value.get("json_schema")
            schema = js.get("schema", js.get("json_schema")) if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("response_format: json_schema.schema (a JSON schema object) is required")
            return StructuredOutputsParams(json=schema, source="response_format")
        raise ValueError(f"response_format: type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    if name == "structured_outputs":
        return StructuredOutputsParams.from_dict(value, "structured_outputs")
    if name == "guided_json":
        return StructuredOutputsParams(json=value if isinstance(value, (str, dict)) else _bad(name, "a JSON schema"),
                                       source=name)
    if name == "guided_choice":
        return StructuredOutputsParams(choice=value, source=name)
    if not isinstance(value, str):
        _bad(name, "a string")
    return StructuredOutputsParams(**{name.removeprefix("guided_"): value, "source": name})


def _bad(name: str, what: str):
    raise ValueError(f"{name} must be {what}")


def structured_outputs_of(body) -> Optional[StructuredOutputsParams]:
    """The one constraint a request body asks for (None for none); ValueError when it asks for several."""
    specs = [(f, spec_of(f, getattr(body, f))) for f in STRUCTURED_FIELDS if getattr(body, f, None) is not None]
    specs = [(f, s) for f, s in specs if s is not None]
    if len(specs) > 1:
        raise ValueError(f"{specs[1][0]}: give one output constraint, got {', '.join(f for f, _ in specs)}")
    return specs[0][1] if specs else None
