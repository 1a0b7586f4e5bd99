"""The API's route table: each route registers its Flask view and describes itself for OpenAPI.

Because one declaration does both, the OpenAPI document cannot miss a route, and
query strings and bodies are validated by the same models the document shows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from controller.web.auth import SESSION_COOKIE, Role, requires
from controller.web.errors import ApiError, validation_detail
from controller.web.schemas import ErrorOut

Method = Literal["GET", "POST", "PUT", "DELETE"]
View = Callable[..., ResponseReturnValue | BaseModel]

_RULE_PARAM = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")
_REF_PREFIX = "#/components/schemas/"
_ERROR_TEXT = {
    400: "malformed request",
    401: "no valid session or API token",
    403: "role too low",
    404: "not found",
    409: "conflict",
    415: "body is not JSON",
    422: "request failed validation",
}


@dataclass(frozen=True)
class ApiRoute:
    method: Method
    rule: str
    endpoint: str
    summary: str
    access: Role
    query: type[BaseModel] | None
    body: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    media_type: str
    errors: tuple[int, ...]
    # A body that is a file of one of these media types rather than a JSON object.
    files: tuple[str, ...]

    @property
    def openapi_path(self) -> str:
        return _RULE_PARAM.sub(r"{\1}", self.rule)

    @property
    def path_params(self) -> list[str]:
        return _RULE_PARAM.findall(self.rule)


def _query_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for key in request.args:
        values = request.args.getlist(key)
        if len(values) > 1:
            raise ApiError(400, "repeated query parameter", f"{key!r} given {len(values)} times")
        # An empty form field means "no filter", not "filter on the empty string".
        if values[0] != "":
            args[key] = values[0]
    return args


def parse_query(model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(_query_args())
    except ValidationError as exc:
        raise ApiError(422, "invalid query parameters", validation_detail(exc)) from None


def parse_body(model: type[BaseModel]) -> Any:
    if not request.is_json:
        raise ApiError(415, "unsupported media type", "send the body as application/json")
    data = request.get_json(silent=True)
    if data is None:
        raise ApiError(400, "malformed JSON", "the body is not valid JSON")
    if not isinstance(data, dict):
        raise ApiError(400, "malformed JSON", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid body", validation_detail(exc)) from None


class ApiTable:
    """Routes of one blueprint, in the order they were declared."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint
        self.routes: list[ApiRoute] = []

    def route(
        self,
        method: Method,
        rule: str,
        *,
        summary: str,
        access: Role,
        query: type[BaseModel] | None = None,
        body: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
        media_type: str = "application/json",
        errors: tuple[int, ...] = (),
        files: tuple[str, ...] = (),
    ) -> Callable[[View], View]:
        def register(fn: View) -> View:
            spec = ApiRoute(
                method,
                rule,
                fn.__name__,
                summary,
                access,
                query,
                body,
                response,
                status,
                media_type,
                tuple(sorted({401, 403, *errors, *((422,) if query or body else ())})),
                files,
            )

            @functools.wraps(fn)
            def view(**path_args: Any) -> ResponseReturnValue:
                kwargs = dict(path_args)
                if spec.query is not None:
                    kwargs["query"] = parse_query(spec.query)
                if spec.body is not None:
                    kwargs["body"] = parse_body(spec.body)
                result = fn(**kwargs)
                if isinstance(result, BaseModel):
                    out: Response = jsonify(result.model_dump(mode="json"))
                    out.status_code = spec.status
                    return out
                return result

            requires(access)(view)
            self.blueprint.add_url_rule(rule, spec.endpoint, view, methods=[method])
            self.routes.append(spec)
            return fn

        return register


def _ref_name(ref: dict[str, Any]) -> str:
    target = str(ref["$ref"])
    if not target.startswith(_REF_PREFIX):
        raise ValueError(f"unexpected schema reference {target}")
    return target[len(_REF_PREFIX) :]


def build_document(
    routes: list[ApiRoute], *, prefix: str, title: str, version: str
) -> dict[str, Any]:
    """An OpenAPI 3.1 document for ``routes`` mounted under ``prefix``."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorOut, "serialization")]
    for r in routes:
        wanted += [(m, "validation") for m in (r.query, r.body) if m is not None]
        if r.response is not None:
            wanted.append((r.response, "serialization"))
    unique = list(dict.fromkeys(wanted))
    refs, top = models_json_schema(unique, ref_template=_REF_PREFIX + "{model}")
    components: dict[str, Any] = dict(top.get("$defs", {}))

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        operation: dict[str, Any] = {
            "operationId": r.endpoint,
            "summary": r.summary,
            "x-required-role": r.access.value,
            "security": [{"bearerAuth": []}, {"sessionCookie": []}],
            "parameters": [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                for p in r.path_params
            ],
        }
        if r.query is not None:
            schema = components[_ref_name(ref(r.query, "validation"))]
            required = set(schema.get("required", []))
            for name, prop in schema.get("properties", {}).items():
                operation["parameters"].append(
                    {"name": name, "in": "query", "required": name in required, "schema": prop}
                )
        if r.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(r.body, "validation")}},
            }
        elif r.files:
            operation["requestBody"] = {
                "required": True,
                "content": {kind: {"schema": {"type": "string"}} for kind in r.files},
            }
        if r.response is not None:
            body_schema = ref(r.response, "serialization")
        elif r.media_type == "application/json":
            body_schema = {"type": "object"}
        else:
            body_schema = {"type": "string", "contentMediaType": r.media_type}
        responses: dict[str, Any] = {
            str(r.status): {
                "description": "success",
                "content": {r.media_type: {"schema": body_schema}},
            }
        }
        for code in r.errors:
            responses[str(code)] = {
                "description": _ERROR_TEXT.get(code, "error"),
                "content": {"application/json": {"schema": ref(ErrorOut, "serialization")}},
            }
        operation["responses"] = responses
        paths.setdefault(prefix + r.openapi_path, {})[r.method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
            },
        },
    }
