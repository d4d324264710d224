"""Make an OpenAPI spec compilable by Stoplight Prism's request validator (ajv).

Ported to Python from prepare-spec.js of the workplace's shared spec kit
(shared/specs/, see NOTICE), keeping its reasoning:

Why: Prism compiles each request-body schema with ajv; ajv throws '"nullable" cannot
be used without "type"' on schemas such as {nullable: true, anyOf: [...]} or
{nullable: true, $ref: ...}. Prism swallows the exception and treats the request as
VALID, so with the unpatched OpenAI spec POST /chat/completions accepts anything
(missing model, role "bogus", ...).

What: every schema object that has `nullable` but no `type` is rewritten so that the
intent (the value may also be null) is kept:
  {nullable: true, anyOf|oneOf: [...]}  -> the same list plus {type: "null"}
  {nullable: true, $ref: X}             -> {anyOf: [{$ref: X}, {type: "null"}]}
  {allOf: [..., {nullable: true}]}      -> {anyOf: [{allOf: [...]}, {type: "null"}]}
  any other {nullable: ...} without type-> `nullable` removed
Schemas with both `type` and `nullable` are left alone (ajv handles them).

--add-5xx=openai|anthropic: neither official spec declares 5xx responses for most
operations, so `Prefer: code=500` is answered with a Prism 404. This adds a "5XX"
response (NOT part of the official spec) with the provider's error-body shape to every
operation that has no 5xx response.

Usage: python -m tests.specs.prepare IN.(yaml|json) OUT.json [--add-5xx=openai|anthropic]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

NULL = {"type": "null"}
ERROR_BODIES: dict[str, Any] = {
    "openai": {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    },
    "anthropic": {
        "type": "error",
        "error": {"type": "api_error", "message": "Internal server error"},
        "request_id": "req_mock",
    },
}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _bare_nullable(schema: Any) -> bool:
    return (
        isinstance(schema, dict)
        and "nullable" in schema
        and all(k in ("nullable", "description") for k in schema)
    )


class Preparer:
    """Rewrites the schemas ajv cannot compile; counts what it changed."""

    def __init__(self) -> None:
        self.changed = 0

    def fix(self, node: Any) -> Any:
        """`node` with every nullable-without-type schema rewritten, recursively."""
        if isinstance(node, list):
            return [self.fix(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: self.fix(value) for key, value in node.items()}
        all_of = out.get("allOf")
        if isinstance(all_of, list) and any(_bare_nullable(s) for s in all_of):
            wants_null = any(_bare_nullable(s) and s["nullable"] is True for s in all_of)
            rest = [s for s in all_of if not _bare_nullable(s)]
            if wants_null:
                del out["allOf"]
                out["anyOf"] = [rest[0] if len(rest) == 1 else {"allOf": rest}, NULL]
            else:
                out["allOf"] = rest
            self.changed += 1
        if "nullable" in out and "type" not in out:
            nullable = out.pop("nullable") is True
            if nullable:
                if isinstance(out.get("anyOf"), list):
                    out["anyOf"] = [*out["anyOf"], NULL]
                elif isinstance(out.get("oneOf"), list):
                    out["oneOf"] = [*out["oneOf"], NULL]
                elif isinstance(out.get("$ref"), str):
                    out["anyOf"] = [{"$ref": out.pop("$ref")}, NULL]
            self.changed += 1
        return out


def add_5xx(spec: dict[str, Any], flavour: str) -> int:
    """Give every operation without one a 5XX response in `flavour`'s error shape."""
    body = ERROR_BODIES[flavour]
    injected = 0
    for item in (spec.get("paths") or {}).values():
        for method in METHODS:
            operation = item.get(method) if isinstance(item, dict) else None
            if not operation or "responses" not in operation:
                continue
            if any(str(code).startswith("5") for code in operation["responses"]):
                continue
            operation["responses"]["5XX"] = {
                "description": "Server error (added by prepare.py --add-5xx; not in the spec)",
                "content": {"application/json": {"schema": {"type": "object"}, "example": body}},
            }
            injected += 1
    return injected


def load(path: Path) -> dict[str, Any]:
    """A spec file, YAML (with libyaml when available: the OpenAI one is 3 MB) or JSON."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        loaded: dict[str, Any] = json.loads(text)
        return loaded
    parsed: dict[str, Any] = yaml.load(text, Loader=_Loader)
    return parsed


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader, leaving dates as the strings JSON has for them."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.copy().items()
}


def prepare(source: Path, target: Path, *, flavour: str | None = None) -> str:
    """Write the prepared spec to `target`; returns a one-line account of the rewrites."""
    preparer = Preparer()
    spec = preparer.fix(load(source))
    injected = add_5xx(spec, flavour) if flavour else 0
    target.write_text(json.dumps(spec), encoding="utf-8")
    return (
        f"prepare: {source.name} -> {target}: {preparer.changed} nullable schema(s) rewritten"
        + (f", 5XX response added to {injected} operation(s)" if flavour else "")
    )


def main(argv: list[str]) -> int:
    """The command line: IN OUT [--add-5xx=openai|anthropic]."""
    flags = [a for a in argv if a.startswith("--")]
    paths = [a for a in argv if not a.startswith("--")]
    flavour = next((f.split("=", 1)[1] for f in flags if f.startswith("--add-5xx=")), None)
    if len(paths) != 2 or (flavour is not None and flavour not in ERROR_BODIES):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    print(prepare(Path(paths[0]), Path(paths[1]), flavour=flavour), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
