"""Tool declarations in the TypeScript style that Kimi K2.5 and K2.6 were trained on.

Their released tokenizer does not put the tools' JSON schemas in the prompt: its
`apply_chat_template` sorts every key of `tools`, turns the functions into TypeScript-like type
declarations and hands them to the template as `tools_ts_str` (the template's JSON fallback is
used only when that conversion fails). This module writes the same text:

    # Tools

    ## functions
    namespace functions {
    // Current weather for a city
    type get_weather = (_: {
      city: string,
      // Degrees
      unit?: "c" | "f"
    }) => any;
    }

Rules (each mirrors the released tokenizer, as the tests' golden outputs pin down):
- parameters of an object: required ones first, then optional ones (`name?`), each group sorted
  by name; fields joined by ",\\n" and indented two spaces per level; an object without fields
  is `{}`; additionalProperties adds `[k: string]: T` (true: any, false: never);
- above a field, `// ` comment lines: its description (one per line), then its constraints
  (`// maxLength: 5, minLength: 1`, sorted: maxLength/minLength/pattern for strings,
  maximum/minimum for numbers, maxItems/minItems for arrays), then `// Default: ...`;
- types: integer is `number`; `enum` is a union of literals ("a" | 3 | True); `anyOf` joins its
  members with " | "; a list of types maps each (object: `{}`, array: `Array<any>`); arrays are
  `Array<T>` (their item's comments, if any, go inside on their own lines); a schema `{}` or
  `true` is `any`, `false` is `null`;
- `$ref` to `#/$defs/X` prints `X`, and each definition becomes `interface X {...}` above the
  function; `$ref: "#"` (the parameters themselves) declares `interface parameters {...}`;
- a function's description becomes comment lines above `type NAME = (_: PARAMS) => any;`.
A schema it cannot express (an unknown `$ref`, an enum value of another type than declared, a
`type` it does not know) raises ValueError; the caller then falls back to the JSON declaration,
as the released tokenizer does.
"""
from __future__ import annotations

import json

INDENT = "  "
CONSTRAINTS = {"string": ("maxLength", "minLength", "pattern"), "number": ("maximum", "minimum"),
               "integer": ("maximum", "minimum"), "array": ("maxItems", "minItems")}
UNION_NAMES = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
               "null": "null", "object": "{}", "array": "Array<any>"}


def to_typescript(tools) -> str:
    """The `tools_ts_str` of a list of OpenAI tools ("" when none is a function); ValueError
    when a schema cannot be written."""
    functions = [_function(t["function"]) for t in tools or ()
                 if isinstance(t, dict) and t.get("type") == "function" and t.get("function")]
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"


# --- parsing: a schema becomes a node (dict), so that every $defs is known before printing ----
class _Defs:
    """The $defs seen so far (in order) and whether the parameters refer to themselves."""

    def __init__(self):
        self.schemas: dict = {}
        self.self_ref = False

    def resolve(self, ref) -> str:
        if ref == "#":
            self.self_ref = True
            return "parameters"
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.split("/")[-1]
            if name not in self.schemas:
                raise ValueError(f"tool schema: $ref {ref!r} names no definition")
            return name
        raise ValueError(f"tool schema: unsupported $ref {ref!r}")


def _node(schema, defs: _Defs) -> dict:
    if isinstance(schema, bool):
        return _scalar("any" if schema else "null", {})
    if not isinstance(schema, dict):
        raise ValueError(f"tool schema: expected an object, got {schema!r}")
    if "$ref" in schema:
        return {"kind": "ref", "doc": _doc_of(schema), "name": defs.resolve(schema["$ref"])}
    if "anyOf" in schema:
        return {"kind": "anyOf", "doc": _doc_of(schema), "types": [_node(s, defs) for s in schema["anyOf"]]}
    if "enum" in schema:
        _check_enum(schema)
        return {"kind": "enum", "doc": _doc_of(schema), "values": schema["enum"]}
    if "type" in schema:
        kind = schema["type"]
        if isinstance(kind, list):
            try:
                names = [UNION_NAMES[k] for k in kind]
            except (KeyError, TypeError):
                raise ValueError(f"tool schema: unsupported type list {kind!r}") from None
            return {"kind": "union", "doc": _doc_of(schema), "names": names}
        if kind == "object":
            return _object(schema, defs)
        if kind == "array":
            items = schema.get("items")
            item = _node(items, defs) if items else _scalar("any", {})
            return {"kind": "array", "doc": _doc_of(schema, CONSTRAINTS["array"]), "item": item}
        return _scalar(kind, schema)
    if schema == {}:
        return _scalar("any", {})
    raise ValueError(f"tool schema: cannot express {schema!r}")


def _scalar(kind, schema) -> dict:
    return {"kind": "scalar", "type": kind, "doc": _doc_of(schema, CONSTRAINTS.get(kind, ()))}


def _object(schema, defs: _Defs) -> dict:
    node = {"kind": "object", "doc": _doc_of(schema), "fields": [], "extra": None}
    if not schema:
        return node
    if "$defs" in schema and schema["$defs"]:
        defs.schemas.update(schema["$defs"])
    extra = schema.get("additionalProperties")
    node["extra"] = _node(extra, defs) if isinstance(extra, dict) else extra
    if "properties" not in schema:
        return node
    required = set(schema.get("required", []))
    for name, prop in schema["properties"].items():
        node["fields"].append({"name": name, "type": _node(prop, defs), "optional": name not in required,
                               "default": prop.get("default") if isinstance(prop, dict) else None})
    return node


def _doc_of(schema, constraint_keys=()) -> tuple:
    """(description, constraints) of a schema, as printed above the field that has it."""
    return schema.get("description", ""), {k: v for k, v in schema.items() if k in constraint_keys}


def _check_enum(schema):
    """Enum values must match a declared type (a pair with "null" declares the other one)."""
    kind = schema.get("type")
    if kind is None:
        return
    if isinstance(kind, list):
        if len(kind) == 1:
            kind = kind[0]
        elif len(kind) == 2 and "null" in kind:
            kind = kind[0] if kind[0] != "null" else kind[1]
        else:
            raise ValueError(f"tool schema: enum type {kind!r} is not supported")
    ok = {"string": lambda v: isinstance(v, str), "number": lambda v: isinstance(v, (int, float)),
          "integer": lambda v: isinstance(v, int), "boolean": lambda v: isinstance(v, bool)}.get(kind)
    for v in schema["enum"]:
        if v is not None and ok is not None and not ok(v):
            raise ValueError(f"tool schema: enum value {v!r} is not of type {kind}")


# --- printing ------------------------------------------------------------------------------
def _comment(text: str, indent: str = "") -> str:
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


def _comments(node, indent: str) -> str:
    """The comment lines above a field: description, then its constraints."""
    description, constraints = node["doc"]
    lines = [_comment(description, indent)] if description else []
    if constraints:
        lines.append(indent + "// " + ", ".join(f"{k}: {v}" for k, v in sorted(constraints.items())))
    return "".join(line + "\n" for line in lines)


def _type(node, indent: str) -> str:
    kind = node["kind"]
    if kind == "scalar":
        return "number" if node["type"] == "integer" else node["type"]
    if kind == "ref":
        return node["name"]
    if kind == "union":
        return " | ".join(node["names"])
    if kind == "anyOf":
        return " | ".join(_type(t, indent) for t in node["types"])
    if kind == "enum":
        return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in node["values"])
    if kind == "array":
        inner = indent + INDENT
        doc = _comments(node["item"], inner)
        if doc:
            return f"Array<\n{doc}{inner}{_type(node['item'], inner)}\n{indent}>"
        return f"Array<{_type(node['item'], indent)}>"
    return _object_type(node, indent)


def _object_type(node, indent: str) -> str:
    fields = sorted((f for f in node["fields"] if not f["optional"]), key=lambda f: f["name"]) + \
        sorted((f for f in node["fields"] if f["optional"]), key=lambda f: f["name"])
    lines = [_field(f, indent + INDENT) for f in fields]
    extra = node["extra"]
    if extra is not None:
        if extra is True:
            t = "any"
        elif extra is False:
            t = "never"
        elif isinstance(extra, dict) and "kind" in extra:
            t = _type(extra, indent + INDENT)
        else:
            raise ValueError(f"tool schema: unsupported additionalProperties {extra!r}")
        lines.append(f"{indent + INDENT}[k: string]: {t}")
    if not lines:
        return "{}"
    return "{\n" + ",\n".join(lines) + "\n" + indent + "}"


def _field(f, indent: str) -> str:
    out = _comments(f["type"], indent)
    d = f["default"]
    if d is not None:
        shown = repr(d) if isinstance(d, (int, float, bool)) else json.dumps(d, ensure_ascii=False)
        out += f"{indent}// Default: {shown}\n"
    return out + f"{indent}{f['name']}{'?' if f['optional'] else ''}: {_type(f['type'], indent)}"


def _function(fn: dict) -> str:
    defs = _Defs()
    params = _object(fn.get("parameters") or {}, defs)
    interfaces = []
    if defs.self_ref:   # the parameters refer to themselves: declared once, by name
        body = ",\n".join(_field(f, INDENT) for f in params["fields"])
        interfaces.append("interface parameters {" + (f"\n{body}\n" if body else "") + "}")
    for name, schema in list(defs.schemas.items()):
        node = _node(schema, defs)
        description = schema.get("description", "")
        interfaces.append((_comment(description) + "\n" if description else "") +
                          f"interface {name} {_type(node, '')}")
    name = fn.get("name", "function")
    signature = "parameters" if defs.self_ref else _type(params, "")
    description = fn.get("description")
    parts = ["\n".join(interfaces), _comment(description) if description else "",
             f"type {name} = (_: {signature}) => any;"]
    return "\n".join(p for p in parts if p)
