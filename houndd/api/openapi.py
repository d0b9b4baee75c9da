"""The served OpenAPI 3.1 document (`GET /v1/openapi.json`).

3.1 because the plan schema (`PLAN_JSON_SCHEMA`) is JSON Schema 2020-12 (`const`, numeric
`exclusiveMinimum`), which OpenAPI 3.0's schema dialect rejects.
"""

from __future__ import annotations

from typing import Any

_PROBLEM = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "field": {"type": "string"},
    },
    "required": ["title", "status"],
}


def _problems(*codes: int) -> dict[str, Any]:
    return {
        str(c): {
            "description": "problem",
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for c in codes
    }


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_PLAN_ID = {"name": "plan_id", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document(version: str) -> dict[str, Any]:
    from houndd.coordinator.plan import PLAN_JSON_SCHEMA

    return {
        "openapi": "3.1.0",
        "info": {"title": "houndd", "version": version},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": _PROBLEM, "Plan": PLAN_JSON_SCHEMA},
        },
        "paths": {
            "/v1/health": {"get": {"responses": {"200": _ok("liveness and role")}}},
            "/v1/openapi.json": {"get": {"responses": {"200": _ok("this document")}}},
            "/v1/node": {
                "get": {"security": _AUTH, "responses": {"200": _ok("this node"), **_problems(401)}}
            },
            "/v1/cluster": {
                "get": {
                    "security": _AUTH,
                    "responses": {"200": _ok("members and coordinator"), **_problems(401)},
                }
            },
            "/v1/nodes/{name}": {
                "get": {
                    "security": _AUTH,
                    "parameters": [_NAME],
                    "responses": {"200": _ok("one member"), **_problems(401, 404)},
                }
            },
            "/v1/nodes/{name}/labels": {
                "put": {
                    "security": _AUTH,
                    "parameters": [_NAME],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "labels": {
                                            "type": "object",
                                            "additionalProperties": {
                                                "type": ["string", "null"],
                                            },
                                        }
                                    },
                                    "required": ["labels"],
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    # 502/504: the node whose labels change did not answer
                    "responses": {
                        "200": _ok("labels set"),
                        **_problems(400, 401, 404, 413, 502, 503, 504),
                    },
                }
            },
            "/v1/keys": {
                "get": {
                    "security": _AUTH,
                    "responses": {"200": _ok("keys per node"), **_problems(401)},
                },
                "post": {
                    "security": _AUTH,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "op": {
                                            "type": "string",
                                            "enum": ["install", "use", "remove"],
                                        },
                                        "key": {"type": "string", "format": "byte"},
                                    },
                                    "required": ["op", "key"],
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "responses": {"200": _ok("result per node"), **_problems(400, 401, 409, 413)},
                },
            },
            "/v1/plans": {
                "get": {"security": _AUTH, "responses": {"200": _ok("plans"), **_problems(401)}},
                "post": {
                    "security": _AUTH,
                    "parameters": [
                        {
                            "name": "dry_run",
                            "in": "query",
                            "required": False,
                            "description": "true: answer what the plan would do on each "
                            "target (images it lacks, bytes, free disk); store nothing",
                            "schema": {"type": "string", "enum": ["true", "false"]},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Plan"}},
                            "application/yaml": {"schema": {"type": "string"}},
                        },
                    },
                    "responses": {
                        "200": _ok("dry run: what the plan would do, nothing stored"),
                        "201": _ok("accepted and replicated"),
                        **_problems(400, 401, 413, 503),
                    },
                },
            },
            "/v1/plans/{plan_id}": {
                "get": {
                    "security": _AUTH,
                    "parameters": [_PLAN_ID],
                    "responses": {"200": _ok("plan status"), **_problems(401, 404)},
                },
                "delete": {
                    "security": _AUTH,
                    "parameters": [_PLAN_ID],
                    "responses": {"200": _ok("cancelled"), **_problems(401, 404, 409, 503)},
                },
            },
            "/v1/plans/{plan_id}/events": {
                "get": {
                    "security": _AUTH,
                    "parameters": [_PLAN_ID],
                    "responses": {
                        "200": {
                            "description": (
                                "server-sent events: `snapshot` (the whole plan), `item` (one "
                                "changed item), `final` (the finished plan without its items), "
                                "`dropped` (this reader fell behind; connect again)"
                            ),
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_problems(401, 404),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "responses": {
                        "200": {
                            "description": "Prometheus metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    }
                }
            },
        },
    }
