"""What the program of a ``.pt2`` (its ``models/model.json``) may hold before
``torch.export.load`` builds anything from it.

``torch.fx`` writes the graph's names (inputs, nodes, arguments, outputs, parameter paths)
verbatim into the Python source it generates and executes, and torch's deserializer passes
shape expressions to ``sympy.sympify``, which evaluates them. So every name must be a plain
ASCII identifier (dotted, for paths), every node target an ATen operator, every shape
expression one of sympy's ``srepr`` form within bounds (:func:`_safe_expression`, a
grammar of its own: no text is ever evaluated to check it), and no string may hold a
character that ends a line of Python. :func:`check_program` refuses anything else in one
line.
"""

from __future__ import annotations

import builtins
import json
import keyword
import re
from typing import Any, NoReturn

from ..errors import MobileNetError

__all__ = ["check_program", "first_line", "is_path"]

_TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+|_operator\.getitem")
# Characters Python's tokenizer takes as a line end (besides \n) and other controls.
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")

# Names torch.fx writes into generated code: not keywords, not builtins, not the globals of
# that code (torch.fx's own rule for the names it makes), not the method's ``self``.
_RESERVED = frozenset(
    {
        *keyword.kwlist,
        *dir(builtins),
        "self",
        "inf",
        "nan",
        "NoneType",
        "torch",
        "device",
        "fx_pytree",
        "pytree",
    }
)
_NAME_MAX = 200  # characters of one name; torch's longest are parameter paths made flat
_PATH_MAX = 1000
_SYMBOL = re.compile(r"[a-z]\d{1,9}")  # s77: torch's names of shape symbols
# Argument kinds that hold no name (constants); tensors and symbols are checked by name, and
# the rest (graphs of higher-order operators, custom objects, operators as values, dicts of
# arguments) our export never writes.
_CONSTANT_ARGUMENTS = frozenset(
    {
        "as_none",
        "as_int",
        "as_ints",
        "as_float",
        "as_floats",
        "as_string",
        "as_strings",
        "as_scalar_type",
        "as_memory_format",
        "as_layout",
        "as_device",
        "as_bool",
        "as_bools",
        "as_complex",
        "as_int_lists",
        "as_float_lists",
    }
)
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})

# Shape expressions as torch.export.save writes them (sympy's srepr): calls of these
# functions on symbols and integers, e.g. Symbol('s77', positive=True, integer=True).
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_]\w*)|(?P<int>\d+)|'(?P<str>[^']*)'|(?P<op>[(),=-]))"
)
_EXPR_FUNCTIONS = frozenset(
    {"Add", "Mul", "FloorDiv", "CeilDiv", "CleanDiv", "Mod", "PythonMod", "Max", "Min"}
)
_EXPR_FLAGS = frozenset({"positive", "nonnegative", "integer"})
_EXPR_MAX_LENGTH = 1000
_EXPR_MAX_DEPTH = 16
_EXPR_MAX_INT = 2**31


def check_program(graph: Any, what: str) -> None:
    """Only ATen operators as node targets, only expressions of our grammar as shapes, no
    line-ending control characters in any string, no guard code, and only plain names
    wherever torch makes a Python identifier of one."""

    def walk(value: Any, key: str | None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k, None)
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str):
            if _BAD_CHARS.search(value):
                raise MobileNetError(f"{what}: control characters in its program")
            if key == "target" and not _TARGET.fullmatch(value):
                raise MobileNetError(f"{what}: calls {value[:80]!r}; only ATen operators load")
            if key == "expr_str" and not _safe_expression(value):
                raise MobileNetError(f"{what}: unexpected shape expression {value[:80]!r}")

    try:
        walk(graph, None)
        if graph.get("guards_code"):
            raise MobileNetError(f"{what}: holds guard code; only programs without load")
        _check_names(graph, what)
    except MobileNetError:
        raise
    except RecursionError:
        raise MobileNetError(f"{what}: damaged .pt2 archive (nested too deeply)") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise MobileNetError(f"{what}: damaged .pt2 archive ({first_line(e)})") from None


def _check_names(program: dict[str, Any], what: str) -> None:
    """Every name of the serialised program (``torch/_export/serde/schema.py``) that torch
    turns into a Python identifier, by where the schema keeps it: a plain identifier (see
    :func:`_is_value_name`); parameter, buffer and module paths dotted identifiers."""
    names = _Names(what)
    module = program["graph_module"]
    names.graph(module["graph"])
    names.signature(module["signature"])
    for entry in module["module_call_graph"]:
        names.call(entry)
    if module.get("treespec_namedtuple_fields"):
        names.refuse("named tuples", sorted(module["treespec_namedtuple_fields"])[0])
    for name in program["range_constraints"]:
        if not _SYMBOL.fullmatch(name):
            names.refuse("a symbol", name)


class _Names:
    """The checks of :func:`_check_names`, one per kind of place in the schema."""

    def __init__(self, what: str) -> None:
        self.what = what

    def refuse(self, kind: str, name: object) -> NoReturn:
        text = name[:80] if isinstance(name, str) else name
        raise MobileNetError(
            f"{self.what}: its program names {kind} {text!r}; only plain names load"
        )

    def value(self, name: object) -> None:
        if not _is_value_name(name):
            self.refuse("a value", name)

    def tensor(self, arg: dict[str, Any]) -> None:  # TensorArgument, TokenArgument
        if set(arg) != {"name"}:
            self.refuse("an argument of fields", sorted(arg))
        self.value(arg["name"])

    def symbol(self, arg: dict[str, Any]) -> None:  # SymIntArgument, its float, bool kinds
        ((kind, v),) = arg.items()
        if kind == "as_name":
            self.value(v)
        elif kind not in ("as_int", "as_float", "as_bool"):
            self.refuse("a symbol of kind", kind)

    def optional(self, arg: dict[str, Any]) -> None:  # OptionalTensorArgument
        ((kind, v),) = arg.items()
        if kind == "as_tensor":
            self.tensor(v)
        elif kind != "as_none":
            self.refuse("an optional tensor of kind", kind)

    def argument(self, arg: dict[str, Any]) -> None:  # the Argument union: one kind, one value
        ((kind, v),) = arg.items()
        if kind in _CONSTANT_ARGUMENTS:
            return
        one = {"as_tensor": self.tensor, "as_optional_tensor": self.optional}
        many = {"as_tensors": self.tensor, "as_optional_tensors": self.optional}
        many |= dict.fromkeys(("as_sym_ints", "as_sym_floats", "as_sym_bools"), self.symbol)
        if kind in one:
            one[kind](v)
        elif kind in ("as_sym_int", "as_sym_float", "as_sym_bool"):
            self.symbol(v)
        elif kind in many:
            for item in v:
                many[kind](item)
        elif kind == "as_nested_tensors":
            for items in v:
                for item in items:
                    self.tensor(item)
        else:
            self.refuse("an argument of kind", kind)

    def graph(self, graph: dict[str, Any]) -> None:
        for arg in [*graph["inputs"], *graph["outputs"]]:
            self.argument(arg)
        for node in graph["nodes"]:
            if node.get("name") is not None:
                self.value(node["name"])
            for named in node["inputs"]:
                if not _is_identifier(named["name"]):  # the operator's schema's (``input``)
                    self.refuse("an argument", named["name"])
                self.argument(named["arg"])
            for arg in node["outputs"]:
                self.argument(arg)
        for table in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values"):
            for name in graph.get(table, {}):
                self.value(name)
        if graph.get("custom_obj_values"):
            self.refuse("custom objects", sorted(graph["custom_obj_values"])[0])

    def signature(self, signature: dict[str, Any]) -> None:
        for spec in [*signature["input_specs"], *signature["output_specs"]]:
            ((kind, fields),) = spec.items()
            if kind == "custom_obj":
                self.refuse("a custom object", fields.get("custom_obj_name"))
            for key, v in fields.items():
                if key == "arg":
                    if "name" in v:  # a TensorArgument, else an Argument (inputs, outputs)
                        self.tensor(v)
                    else:
                        self.argument(v)
                elif key in ("parameter_name", "buffer_name", "tensor_constant_name"):
                    if not is_path(v):
                        self.refuse("a parameter", v)
                elif key in ("name", "user_input_name"):
                    self.value(v)

    def call(self, entry: dict[str, Any]) -> None:  # an entry of the module call graph
        if entry["fqn"] and not is_path(entry["fqn"]):
            self.refuse("a module", entry["fqn"])
        call = entry.get("signature")
        if call:
            for arg in [*call["inputs"], *call["outputs"]]:
                self.argument(arg)
            for name in call.get("forward_arg_names") or []:
                self.value(name)
            for spec in (call["in_spec"], call["out_spec"]):
                _check_treespec(json.loads(spec)[1], self.refuse, depth=0)


def _check_treespec(spec: dict[str, Any], refuse, depth: int) -> None:
    """A pytree spec of ``forward``'s arguments or results: tuples, lists and dicts whose
    keys (which name ``forward``'s keyword arguments) are plain names."""
    if depth > 8 or spec["type"] not in _TREESPEC_TYPES:
        refuse("a structure", spec["type"])
    if spec["type"] == "builtins.dict":
        for key in json.loads(spec["context"]):
            if not _is_value_name(key):
                refuse("a keyword argument", key)
    for child in spec["children_spec"]:
        _check_treespec(child, refuse, depth + 1)


def _is_identifier(name: object) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= _NAME_MAX
        and name.isascii()
        and name.isidentifier()
    )


def _is_value_name(name: object) -> bool:
    """Whether ``name`` can be a variable of the code torch.fx generates: an ASCII
    identifier that is no keyword, builtin, global of that code, or dunder."""
    return (
        _is_identifier(name)
        and name not in _RESERVED
        and not (name.startswith("__") and name.endswith("__"))  # type: ignore[union-attr]
    )


def is_path(path: object) -> bool:
    """Whether ``path`` is a module attribute's path (``features.0.conv.weight``): names
    and indices, which torch.fx writes as ``self.features`` and ``getattr(.., "0")``."""
    if not isinstance(path, str) or not 0 < len(path) <= _PATH_MAX:
        return False
    return all(
        (part.isascii() and part.isdecimal())
        or (_is_identifier(part) and not keyword.iskeyword(part) and not part.startswith("__"))
        for part in path.split(".")
    )


def _safe_expression(text: str) -> bool:
    """Whether ``text`` is a shape expression of our grammar, which follows what
    ``torch.export.save`` writes (sympy's ``srepr``)::

        expr := "Symbol(" 'NAME' ("," FLAG "=" ("True" | "False"))* ")"
              | "Integer(" ["-"] DIGITS ")"
              | FUNCTION "(" expr ("," expr)* ")"

    NAME like ``s77``, FLAG one of :data:`_EXPR_FLAGS`, FUNCTION one of
    :data:`_EXPR_FUNCTIONS`, integers at most 2**31, nesting and length bounded. No power,
    no operator: what it accepts ``sympify`` evaluates at once."""
    if len(text) > _EXPR_MAX_LENGTH:
        return False
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        if match is None:
            return False
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))  # type: ignore[arg-type]
        pos = match.end()
    tokens.append(("end", ""))
    at = 0

    def take(kind: str, *values: str) -> str:
        nonlocal at
        got_kind, got = tokens[at]
        if got_kind != kind or (values and got not in values):
            raise ValueError(got)
        at += 1
        return got

    def peek(value: str) -> bool:
        return tokens[at] == ("op", value)

    def expr(depth: int) -> None:
        if depth > _EXPR_MAX_DEPTH:
            raise ValueError("too deep")
        function = take("name")
        take("op", "(")
        if function == "Symbol":
            if not _SYMBOL.fullmatch(take("str")):
                raise ValueError("symbol")
            while peek(","):
                take("op", ",")
                take("name", *_EXPR_FLAGS)
                take("op", "=")
                take("name", "True", "False")
        elif function == "Integer":
            if peek("-"):
                take("op", "-")
            digits = take("int")
            if len(digits) > 10 or int(digits) > _EXPR_MAX_INT:
                raise ValueError(digits)
        elif function in _EXPR_FUNCTIONS:
            expr(depth + 1)
            while peek(","):
                take("op", ",")
                expr(depth + 1)
        else:
            raise ValueError(function)
        take("op", ")")

    try:
        expr(0)
        take("end")
    except ValueError:
        return False
    return True


def first_line(e: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
