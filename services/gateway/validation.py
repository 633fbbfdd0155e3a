"""The gateway's check of request bodies: every body of a published POST operation (gateway/openapi.py) is parsed
and validated against that operation's request schema in the published document itself, whole (nested fields
included), before anything reaches a router. A violation is a 400 in OpenAI's error shape whose `param` is the
JSON path of the offending field (`messages[0].content`; a top-level field by its name, as vLLM and OpenAI write
it), so the document says exactly what the gateway accepts (tests/test_fuzz_gateway.py holds it to that).

Why here and not only in vLLM: vLLM's request models are lax where its schema is strict (pydantic coerces "5" to 5
and false to 0), read some fields raw before validating them (`"structured_outputs": [null]` is a 500 there), and
hand some unbounded integers to its engine core (msgspec cannot encode 2**64: a 500, or a stream that ends in an
error). The document states the bounds vLLM enforces in code and 64-bit bounds on every integer (openapi.py), so one
check against it covers all of these.

One validator per document (`RequestValidator`): jsonschema's validator class for the document's dialect (OpenAPI
3.1: JSON Schema 2020-12), with the document as the one resource its `$ref`s resolve in, made when the document is
built. Measured on a typical chat body (a system and a user message, sampling options): 0.15-0.6 ms;
fastjsonschema was 5-7x faster but compiles a schema into Python code and runs it (here a document that came over
the network), and speaks drafts 4-7, not the document's 2020-12. Cost grows with the body's size and nesting, so a
large or deeply nested body (OFF_LOOP_BYTES, OFF_LOOP_NESTS) is parsed and validated in a worker thread: the event
loop keeps serving the other requests and streams meanwhile.

What no schema says and is checked here too: the body must be JSON (RFC 8259: NaN and Infinity are not, though
Python's parser reads them) and an object.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
from jsonschema.exceptions import ValidationError

from expertmesh.gateway.errors import APIError

# A body larger than this, or with more objects and arrays than OFF_LOOP_NESTS, is parsed and validated in a thread:
# on the loop it would hold every other request meanwhile. Measured: ~2 us a byte for many small messages (~8 ms at
# 4 KiB), and ~0.2-0.7 ms a level for a free-form value nested deep (JSONValue is recursive: ~10 ms at 32 levels in
# a few hundred bytes). A typical chat body (< 2 KiB, a handful of objects) stays on the loop, where a thread costs
# more than the check.
OFF_LOOP_BYTES = 4 * 1024
OFF_LOOP_NESTS = 32
DOCUMENT_URI = "urn:expertmesh:gateway:openapi"  # the published document's name in the validator's registry
MAX_MESSAGE_CHARS = 400  # a message quotes the offending value: bounded, whatever its size


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def parse(body: bytes) -> dict:
    """The JSON object `body`; a 400 APIError if it is not one."""
    if not body:
        raise APIError(400, "The request body is required (a JSON object).", "invalid_request_error", None, None)
    try:
        request = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, NaN / Infinity, nested past the parser
        detail = str(exc) if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise APIError(400, f"The request body is not valid JSON: {detail}"[:MAX_MESSAGE_CHARS]) from None
    if not isinstance(request, dict):
        raise APIError(400, f"The request body must be a JSON object, got {_json_type(request)}.")
    return request


class RequestValidator:
    """Validators of the request bodies of `document`'s operations that take JSON, compiled once."""

    def __init__(self, document: dict):
        dialect = document.get("jsonSchemaDialect")  # OpenAPI 3.1's default dialect is JSON Schema 2020-12
        cls = jsonschema.validators.validator_for(
            {"$schema": dialect} if dialect else {}, jsonschema.Draft202012Validator
        )
        resource = referencing.jsonschema.specification_with(cls.META_SCHEMA["$schema"]).create_resource(document)
        registry = referencing.Registry().with_resource(DOCUMENT_URI, resource)
        self.validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
        for path, operations in document.get("paths", {}).items():
            for method, operation in operations.items():
                if "schema" not in operation.get("requestBody", {}).get("content", {}).get("application/json", {}):
                    continue
                pointer = "/".join(
                    p.replace("~", "~0").replace("/", "~1")
                    for p in ("paths", path, method, "requestBody", "content", "application/json", "schema")
                )
                self.validators[method.upper(), path] = cls({"$ref": f"{DOCUMENT_URI}#/{pointer}"}, registry=registry)

    def check(self, method: str, path: str, request: Any) -> None:
        """Raise a 400 APIError naming the offending field when `request` (parsed JSON) does not match the request
        schema of `method` `path`; an operation without one takes anything."""
        validator = self.validators.get((method, path))
        if validator is None:
            return
        try:
            if validator.is_valid(request):  # the common case, cheaper than collecting errors
                return
            error = _explain(list(validator.iter_errors(request)))
        except RecursionError:  # a body nested deeper than Python recurses
            raise APIError(400, "The request body is nested too deeply.", "invalid_request_error") from None
        raise error


async def check_body(validator: RequestValidator | None, method: str, path: str, body: bytes) -> dict:
    """`body` of a POST to `path` parsed (a JSON object) and checked against the published schema (`validator`;
    None while no document could be had: then only parsed); a 400 APIError otherwise. A large body in a thread."""

    def check() -> dict:
        request = parse(body)
        if validator is not None:
            validator.check(method, path, request)
        return request

    costly = len(body) > OFF_LOOP_BYTES or body.count(b"{") + body.count(b"[") > OFF_LOOP_NESTS
    return await asyncio.to_thread(check) if costly else check()


# ---- what a violation says ---------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _param(path) -> str | None:
    """A JSON path without its root: `messages[0].content`; None for the body itself."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _excluded(branch_errors: list[ValidationError]) -> bool:
    """A branch of an anyOf that is plainly another kind of value: the instance has the wrong JSON type for it, or a
    tag of it (`role`, `type`: a const or enum of a direct property) does not match."""
    return any(
        e.validator in ("type", "const", "enum") and len(e.relative_path) <= (0 if e.validator == "type" else 1)
        for e in branch_errors
    )


def _focus(error: ValidationError) -> ValidationError:
    """Down an anyOf / oneOf to the branch the instance was meant for (the first one not plainly of another kind),
    and to that branch's own error; the anyOf itself where no branch fits (its types are then listed)."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        branches: dict[int, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        candidates = [errors for _, errors in sorted(branches.items()) if not _excluded(errors)]
        if not candidates:
            return error
        error = jsonschema.exceptions.best_match(candidates[0])
    return error


def _allowed_types(error: ValidationError) -> list[str]:
    if error.validator == "type":
        value = error.validator_value
        return list(value) if isinstance(value, list) else [value]
    types: list[str] = []
    for sub in error.context or []:
        if sub.validator == "type" and not sub.relative_path:
            for kind in sub.validator_value if isinstance(sub.validator_value, list) else [sub.validator_value]:
                if kind not in types:
                    types.append(kind)
    return types


def _explain(errors: list[ValidationError]) -> APIError:
    """The 400 for a body with these schema violations: the most relevant one (jsonschema's best_match, followed
    into the branch of a union the value was meant for), with the offending field's JSON path as `param`."""
    error = _focus(jsonschema.exceptions.best_match(errors))
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = next((name for name in error.validator_value if name not in error.instance), None)
        param = _param([*path, missing] if missing else path)
        return APIError(
            400, f"Missing required parameter: '{param}'.", "invalid_request_error", param, "missing_required_parameter"
        )
    param = _param(path)
    where = f"'{param}'" if param else "the request body"
    types = _allowed_types(error)
    if types and error.validator in ("type", "anyOf", "oneOf"):
        message = f"Invalid type for {where}: expected {' or '.join(types)}, got {_json_type(error.instance)}."
        return APIError(400, message, "invalid_request_error", param, "invalid_type")
    message = f"Invalid {where}: {error.message}"
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return APIError(400, message, "invalid_request_error", param, "invalid_value")
