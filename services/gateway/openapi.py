"""The gateway's published OpenAPI document (GET /openapi.json): exactly what the gateway accepts and answers.

Why it exists: the gateway serves no OpenAI logic of its own; the operations it serves (proxy.SERVED) are relayed to
the routers, vLLM's own OpenAI servers. FastAPI's own document would describe that relay: one route, any method,
any body, one 200. What a client may send and get back is vLLM's serving layer as the gateway admits it, so the
document is built from a router's own (vLLM's /openapi.json and /v1/models, fetched from a router on the first
request and then kept):

- paths: the router's operations that proxy.SERVED names (POST /v1/chat/completions, POST /v1/completions, GET
  /v1/models) and the gateway's own routes (/health, /metrics, /experts, /proxy/routers, /openapi.json); every
  other path of the router (vLLM's extra APIs, /tokenize, /expertmesh/*, ...) is neither relayed nor published;
- answers: every status the gateway itself can give, in OpenAI's error shape (400 a body that does not match its
  schema; 401 without a valid API key, with WWW-Authenticate; 405 with Allow; 408 a body not received in time; 413
  a body too large; 429 every router at its admission bound, with Retry-After; 502 a router that broke off; 503 no
  router available, with Retry-After); vLLM's own errors (its validation answers 400, never FastAPI's 422; an
  unknown model 404); server-sent events beside JSON for the operations that stream;
- requests: vLLM's request schemas with the bounds vLLM enforces in code rather than in its schema
  (_sampling_bounds: temperature in [0, 2], at most 20 logprobs, ...) and 64-bit bounds on every integer. The
  gateway validates every request body against this very document (validation.py), so what it publishes is what
  it enforces. What no JSON schema can say (a prompt and max_tokens over the model's context, min_tokens over
  max_tokens, token ids outside the vocabulary, options that need a server flag) is vLLM's to refuse, with a 400,
  and written in the 400's description.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from typing import Any

import httpx

from expertmesh.core import auth
from expertmesh.gateway import proxy, validation
from expertmesh.gateway.errors import APIError

# OpenAI's error shape, as both the gateway (errors.APIError: `code` a string such as "invalid_api_key", or null)
# and vLLM (`code` the HTTP status) write it.
GATEWAY_ERROR_SCHEMA = {
    "title": "OpenAIError",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/OpenAIError"}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def _error_response(description: str, headers: dict | None = None, schema: dict = _ERROR_REF) -> dict:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


# Statuses the gateway adds to every relayed /v1 operation.
RELAYED_ERRORS = {
    "401": _error_response(
        "No valid API key (only when the gateway has API keys): 'Authorization: Bearer <key>'.",
        {"WWW-Authenticate": {"description": "the scheme wanted: Bearer", "schema": {"type": "string"}}},
    ),
    "405": _error_response(
        "The method is not one the path serves.",
        {"Allow": {"description": "the methods the path serves", "schema": {"type": "string"}}},
    ),
    "408": _error_response("The request body was not received in time (the connection is closed)."),
    "413": _error_response("The request body is larger than the gateway accepts."),
    "502": _error_response("The router failed after accepting the request."),
    "503": _error_response("No router is available to serve the request.", _RETRY_AFTER),
}
# Only a POST (a generation) is subject to the admission bound.
ADMISSION_ERROR = {
    "429": _error_response("Every router is at its bound of requests in flight; retry shortly.", _RETRY_AFTER)
}
VLLM_400 = (
    "The request is invalid: its body does not match the operation's request schema (checked by the gateway; "
    "`param` is the JSON path of the offending field, e.g. messages[0].content), or vLLM's validation refused it "
    "(relayed) for what a schema cannot say: a prompt that with max_tokens exceeds the model's context length "
    "(max_model_len), min_tokens over max_tokens, token ids (in a prompt, logit_bias, stop_token_ids, "
    "allowed_token_ids) outside the vocabulary, options that do not go together (tool_choice without tools, "
    "stream_options without stream, ...), options that need a server flag, a chat template or structured-output "
    "grammar that does not compile, content the model cannot take (images, audio), messages in another model "
    "family's format (openai_harmony's, for gpt-oss), assistant tool calls of a type other than function, "
    "bad_words that tokenize to nothing, beam search with streaming. The gateway also refuses a body "
    "nested deeper than it can check (a free-form value about 150 levels deep)."
)


INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # no field of the API means anything past 64 bits
# The request models of the served generations, whose bounds were read off vLLM's code and checked against its
# server (_sampling_bounds).
SAMPLING_REQUESTS = ("CompletionRequest", "ChatCompletionRequest")


def _sampling_bounds(max_model_len: int | None) -> dict[str, dict]:
    """What vLLM checks in code (SamplingParams, the request models' validators) for fields its schema leaves open:
    property -> the JSON schema of its non-null value. `max_model_len`: the served model's context length."""
    tokens = {"type": "integer", "minimum": 1} | ({"maximum": max_model_len} if max_model_len else {})
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    non_empty = {"type": "string", "minLength": 1}
    return {
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": UINT64_MAX},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "n": {"type": "integer", "minimum": 1, "maximum": 16384},  # VLLM_MAX_N_SEQUENCES
        "max_tokens": tokens,
        "max_completion_tokens": tokens,
        "min_tokens": {"type": "integer", "minimum": 0} | ({"maximum": max_model_len} if max_model_len else {}),
        "prompt_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "stop": {"anyOf": [non_empty, {"type": "array", "items": non_empty, "maxItems": 4}]},
        "bad_words": {"type": "array", "items": non_empty},
        "stop_token_ids": token_ids,
        "allowed_token_ids": token_ids | {"minItems": 1},
        "logprob_token_ids": token_ids,
        "logit_bias": {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number"},
        },
        "truncate_prompt_tokens": {
            "anyOf": [
                {"const": -1},
                {"type": "integer", "minimum": 1} | ({"maximum": max_model_len} if max_model_len else {}),
            ]
        },
        "stream_interval": {"type": "integer", "minimum": 1, "maximum": UINT64_MAX},
        # vLLM's own check (generate/base/protocol.py) is stricter than its schema's 1024
        "cache_salt": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[^@/\\\x00]*$"},
        "tools": {"type": "array", "minItems": 1},  # vLLM: "tools" given must name at least one
    }


def _bound(schemas: dict, max_model_len: int | None) -> None:
    """_sampling_bounds into SAMPLING_REQUESTS; completions' integer `logprobs` at most 20; a completion's prompt and
    a chat's messages required and not empty; RepetitionDetectionParams' integers as pydantic takes them."""
    bounds = _sampling_bounds(max_model_len)
    for name in SAMPLING_REQUESTS:
        properties = schemas.get(name, {}).get("properties", {})
        for prop, bound in bounds.items():
            if prop in properties:
                properties[prop] = _with_bound(properties[prop], bound)
    for prop in schemas.get("RepetitionDetectionParams", {}).get("properties", {}).values():
        prop["type"] = ["integer", "boolean"]  # pydantic takes false/true for 0/1 here
    completion = schemas.get("CompletionRequest", {}).get("properties", {})
    if completion:
        completion["logprobs"] = _with_bound(completion["logprobs"], {"type": "integer", "minimum": 0, "maximum": 20})
        ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
        completion["prompt"] = {
            "title": "Prompt",
            "description": "Text, token ids, or several of either (one completion each); not empty.",
            "anyOf": [
                {"type": "string", "minLength": 1},
                ids,
                {"type": "array", "items": ids, "minItems": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            ],
        }
        schemas["CompletionRequest"]["required"] = ["prompt"]
    chat = schemas.get("ChatCompletionRequest", {}).get("properties", {})
    if chat:
        chat["messages"]["minItems"] = 1


def _integer_bounds(value: Any) -> None:
    """Every integer within 64 bits: [-2**63, 2**64 - 1] where vLLM's schema leaves a side open (vLLM hands some
    integers to its engine core unchecked, and msgspec cannot encode one past 64 bits: a 500), and vLLM's int64
    bounds, which its schema writes as floats (9.223372036854776e+18 is 2**63, one past what it accepts), exact."""
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
            if value.get("maximum") == float(2**63):
                value["maximum"] = 2**63 - 1
            if value.get("minimum") == -float(2**63):
                value["minimum"] = INT64_MIN
            if "minimum" not in value and "exclusiveMinimum" not in value:
                value["minimum"] = INT64_MIN
            if "maximum" not in value and "exclusiveMaximum" not in value:
                value["maximum"] = UINT64_MAX
        for key, item in value.items():
            if key not in ("not", "default", "examples", "const", "enum"):  # (a bound inside `not` would invert)
                _integer_bounds(item)
    elif isinstance(value, list):
        for item in value:
            _integer_bounds(item)


JSON_VALUE = "JSONValue"  # components.schemas name of a free-form value (_json_values)


def _json_values(schemas: dict) -> None:
    """Free-form values (vLLM's `{}` and `{"type": "object", "additionalProperties": true}`: a structured-output JSON
    schema, tool parameters, kv_transfer_params, an unknown field of an object) as components.schemas.JSONValue: any
    JSON value whose integers are within 64 bits. vLLM passes some of them to its engine core as they are, and
    msgspec cannot encode a larger integer (a 500, e.g. `"structured_outputs": {"json": {"maximum": 2**64}}`)."""
    ref = {"$ref": f"#/components/schemas/{JSON_VALUE}"}

    def free(value: Any) -> bool:
        if not isinstance(value, dict):
            return False
        shape = {k: v for k, v in value.items() if k not in ("title", "description", "default", "deprecated")}
        return not shape or shape == {"type": "object", "additionalProperties": True}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if value.get("additionalProperties") is True:
                value["additionalProperties"] = dict(ref)
            for key, item in value.items():
                if key in ("default", "examples", "const", "enum"):
                    continue  # values, not schemas
                if key == "properties" and isinstance(item, dict):
                    for name, prop in item.items():
                        item[name] = _free_to(prop, ref) if free(prop) else prop
                        walk(item[name])
                elif key in ("items", "additionalProperties") and free(item):
                    value[key] = _free_to(item, ref)
                elif key in ("anyOf", "oneOf", "allOf") and isinstance(item, list):
                    item[:] = [_free_to(branch, ref) if free(branch) else branch for branch in item]
                    walk(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(schemas)
    schemas[JSON_VALUE] = {
        "title": JSON_VALUE,
        "description": "Any JSON value; its numbers within [-2**63, 2**64 - 1].",
        "anyOf": [
            {"type": ["string", "boolean", "null"]},
            # = integers within 64 bits, and any number with a fraction: every float past 2**53 is integral
            {"type": "number", "minimum": INT64_MIN, "maximum": UINT64_MAX},
            {"type": "array", "items": dict(ref)},
            {"type": "object", "additionalProperties": dict(ref)},
        ],
    }


def _free_to(schema: dict, ref: dict) -> dict:
    """A free-form `schema` as `ref`, its annotations kept (an object stays an object)."""
    keep = {k: v for k, v in schema.items() if k in ("title", "description", "default", "deprecated")}
    if schema.get("type") == "object":
        return keep | {"type": "object", "additionalProperties": dict(ref)}
    return keep | dict(ref)


def _with_bound(prop: dict, bound: dict) -> dict:
    """`prop` (vLLM's schema of one property: a type, or anyOf [type, null]) with its non-null value bounded by
    `bound`: merged into vLLM's schema of the value where that is one plain schema (its `items` kept), else in its
    place."""
    keep = {k: v for k, v in prop.items() if k in ("title", "description", "default", "deprecated")}
    branches = prop.get("anyOf", [{k: v for k, v in prop.items() if k not in keep}])
    values = [branch for branch in branches if branch.get("type") != "null"]
    nullable = len(values) < len(branches)
    if len(values) == 1 and "anyOf" not in values[0] and "anyOf" not in bound:
        bound = values[0] | bound
    return keep | ({"anyOf": [bound, {"type": "null"}]} if nullable else bound)


def _served_operations(router_doc: dict) -> dict[str, dict]:
    """The router's operations that the gateway serves (proxy.SERVED), as the router documents them."""
    paths = router_doc.get("paths", {})
    served = {}
    for path, methods in proxy.SERVED.items():
        operations = {m.lower(): paths[path][m.lower()] for m in methods if m.lower() in paths.get(path, {})}
        if operations:
            served[path] = operations
    return served


def _relayed(operation: dict, method: str) -> dict:
    """A router operation as the gateway serves it: the gateway's statuses added; vLLM's error statuses with the
    error body vLLM really writes (FastAPI's 422 schema describes an answer vLLM never gives: its validation
    errors are 400s; its 422 is its own error body, for a media URL it cannot fetch)."""
    operation = copy.deepcopy(operation)
    responses = operation.setdefault("responses", {})
    for status, response in list(responses.items()):
        if status.startswith(("4", "5")):  # vLLM's own error body, in OpenAI's shape (vLLM's ErrorResponse)
            responses[status] = _error_response(response.get("description", ""))
    if "422" in responses:
        responses["422"] = _error_response("A media URL or file vLLM cannot fetch or read.")
    if "requestBody" in operation or operation.get("parameters"):
        responses["400"] = _error_response(VLLM_400)
    responses.update(copy.deepcopy(RELAYED_ERRORS))
    if method == "post":
        responses.update(copy.deepcopy(ADMISSION_ERROR))
    return operation


def _own_routes(own_doc: dict) -> dict[str, dict]:
    """The gateway's own routes from FastAPI's document of the app, with what they really answer."""
    paths = {p: copy.deepcopy(ops) for p, ops in own_doc.get("paths", {}).items() if not p.startswith("/v1/")}
    for ops in paths.values():
        for op in ops.values():
            op["responses"]["405"] = copy.deepcopy(RELAYED_ERRORS["405"])
    if "/health" in paths:
        paths["/health"]["get"]["responses"]["503"] = {
            "description": "A router is down or some (layer, expert) has no live replica; the body says which.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"]["200"] = {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    if "/experts" in paths:
        responses = paths["/experts"]["get"]["responses"]
        responses["401"] = copy.deepcopy(RELAYED_ERRORS["401"])
        responses["503"] = _error_response("No router is reachable.")
    if "/openapi.json" in paths:
        responses = paths["/openapi.json"]["get"]["responses"]
        responses["200"] = {
            "description": "This document.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
        responses["503"] = _error_response("No router answered for the document yet.", _RETRY_AFTER)
    return paths


def build(router_doc: dict, own_doc: dict, max_model_len: int | None = None) -> dict:
    """The gateway's document from the router's (`router_doc`, vLLM's /openapi.json), FastAPI's document of the
    gateway's own routes (`own_doc`) and the served model's context length."""
    schemas = copy.deepcopy(router_doc.get("components", {}).get("schemas", {}))
    paths: dict[str, dict] = _own_routes(own_doc)
    for path, ops in _served_operations(router_doc).items():
        paths[path] = {method: _relayed(op, method) for method, op in ops.items()}
    _bound(schemas, max_model_len)
    schemas["OpenAIError"] = copy.deepcopy(GATEWAY_ERROR_SCHEMA)
    _keep_referenced(paths, schemas)
    _json_values(schemas)
    _integer_bounds(schemas)
    return {
        "openapi": router_doc.get("openapi", "3.1.0"),
        "info": {"title": "expertmesh gateway", "version": own_doc.get("info", {}).get("version", "0.1.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _keep_referenced(paths: dict, schemas: dict) -> None:
    """Drop the schemas no kept operation refers to (those of the router's other paths)."""
    wanted: set[str] = set()
    frontier: list[Any] = [paths]
    while frontier:
        value = frontier.pop()
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in wanted and name in schemas:
                    wanted.add(name)
                    frontier.append(schemas[name])
            frontier.extend(value.values())
        elif isinstance(value, list):
            frontier.extend(value)
    for name in set(schemas) - wanted:
        del schemas[name]


class PublishedDocument:
    """The document, built once from the first router that answers (its /openapi.json and /v1/models) and kept with
    its request validator: every router runs the same vLLM on the same model, and a gateway is restarted with its
    routers' upgrade."""

    def __init__(self, own_doc: Callable[[], dict], timeout_s: float = 10.0):
        self.own_doc, self.timeout_s = own_doc, timeout_s
        self.body: bytes | None = None
        self.validator: validation.RequestValidator | None = None
        self._lock = asyncio.Lock()

    async def request_validator(self, router_urls: list[str]) -> validation.RequestValidator | None:
        """The validator of the document's request bodies; None while no router answers for the document (a
        request then meets no router either: the relay answers 503)."""
        if self.validator is None:
            try:
                await self.get(router_urls)
            except APIError:
                return None
        return self.validator

    async def get(self, router_urls: list[str]) -> bytes:
        """The document as JSON bytes; an APIError 503 while no router answers."""
        async with self._lock:
            if self.body is None:
                document = await self._build(router_urls)
                # made before the document is published: a request never meets a document without its validator
                self.validator = validation.RequestValidator(document)
                self.body = json.dumps(document).encode()
            return self.body

    async def _build(self, router_urls: list[str]) -> dict:
        failures = []
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=auth.http_headers()) as http:
            for url in router_urls:
                try:
                    doc = await http.get(f"{url}/openapi.json")
                    models = await http.get(f"{url}/v1/models")
                    doc.raise_for_status()
                    models.raise_for_status()
                    lengths = [
                        m["max_model_len"] for m in models.json()["data"] if isinstance(m.get("max_model_len"), int)
                    ]
                    return build(doc.json(), self.own_doc(), min(lengths) if lengths else None)
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    failures.append(f"{url} ({type(exc).__name__})")
        raise APIError(
            503,
            "No router answered for the API document (tried: " + ", ".join(failures) + ").",
            "server_error",
            None,
            "no_router_available",
            headers={"Retry-After": "1"},
        )
