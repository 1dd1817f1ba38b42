"""Request bodies of the OpenAI API subset edgellm serves (unknown fields are accepted).

Everything a request can get wrong is refused here, as a 400 naming the field: non-finite
numbers, strings that are not text (lone surrogates), content parts this model cannot read, tool
names outside OpenAI's alphabet, parameter schemas that are not JSON Schema."""

from __future__ import annotations

from typing import Any, Literal

import jsonschema  # here, not on first use: its import took a restarted server's first
# request with tools 0.19 s on the AVX2-only host
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


def surrogate_at(value, where: str = "") -> str | None:
    """The path of the first string holding a lone surrogate (not encodable as UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            found = surrogate_at(k, where) or surrogate_at(v, f"{where}.{k}".lstrip("."))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if found := surrogate_at(v, f"{where}.{i}".lstrip(".")):
                return found
    return None


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _text_only(self):
        where = surrogate_at(self.model_dump())
        if where:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate, which is not text")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        """Content parts: text ones only ({"type": "text", "text": "..."})."""
        for i, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"part {i} is {'of type ' + repr(kind) if kind else 'not a content part'}: "
                                 f"this model reads text parts only")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: a text part's text must be a string")
        return content


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _json_schema(cls, schema):
        if schema is not None:
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"not a JSON Schema: {e.message}") from None
        return schema


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class Sampling(Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0)  # edgellm's (the vendor's post_config)
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = None  # any integer; taken modulo 2**64
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None  # always strict here: decoding follows the schema


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    # passed to the chat template (vLLM's and llama-server's field): {"enable_thinking": false}
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(Sampling):
    prompt: str
