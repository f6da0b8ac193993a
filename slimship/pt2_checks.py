"""Checks on the parts of a .pt2 that torch would evaluate, import or turn into code (used by loading.py).

Every string from the graph JSON that reaches `sympy.sympify`, an operator lookup or generated Python code is
checked against an allowlist; pickles are only read as opcodes (`pickletools`), never loaded.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from slimship.errors import ModelFileError

OPT_IN = "pass --allow-pickle (or set model.allow_pickle: true) only if you trust the file's author"


class PickleRequiredError(ModelFileError):
    """The file can only be opened by unpickling part of it, which was not allowed."""


# ------------------------------------------------------------------ allowlists for strings torch evaluates

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FQN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_SYMBOL = re.compile(r"^[a-z]{1,4}[0-9]+$")  # s0, u3, zf1, ps2 ...
_OP_TARGET = re.compile(
    r"^torch\.ops\.(aten|prims|higher_order|quantized_decomposed)\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"
)
_SYM_TARGETS = frozenset(
    [f"_operator.{n}" for n in "eq ne le ge lt gt neg pos mul add sub floordiv mod pow truediv and_ or_ "
     "lshift rshift getitem".split()]
    + ["math.trunc", "math.floor", "math.ceil", "math.sqrt"]
    + [f"torch.{n}" for n in "sym_not sym_int sym_float sym_ite sym_max sym_min sym_sqrt".split()]
)  # fmt: skip
# Names a shape expression may use: the functions the deserializer defines for sympify
# (torch.utils._sympy.functions), the sympy classes `srepr` writes, and symbol assumption keywords.
_EXPR_FUNCTIONS = frozenset(
    "FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift "
    "PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat "
    "TruncToInt RoundToInt RoundDecimal ToFloat Identity "
    "Symbol Integer Rational Float Add Mul Pow Max Min Abs floor ceiling sqrt And Or Not "
    "Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan "
    "true false True False oo zoo nan int_oo IntInfinity NegativeIntInfinity Infinity NegativeInfinity "
    "Half One Zero NegativeOne".split()
)
_EXPR_KEYWORDS = frozenset(
    "integer positive negative nonnegative nonpositive real finite infinite even odd zero nonzero "
    "commutative extended_real precision".split()
)
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<kw>[a-z_]+)=(?!=)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[^']*')"
    r"|(?P<num>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)|(?P<op>\*\*|[<>!=]=|[-+*/%<>(),~&|]))\s*"
)
_QUOTED = re.compile(r"^'(?:[a-z]{1,4}[0-9]+|-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)'$")
_GUARD = re.compile(
    r"^L\[(?:'[A-Za-z_][A-Za-z0-9_]*'|[0-9]+)\](?:\.size\(\)\[[0-9]+\])? (?:==|!=|<=|>=|<|>) -?[0-9]+$"
)
_DROPPED_META = ("stack_trace", "custom")  # reach generated code as comments; not needed to run


# ------------------------------------------------------------------------------------------ bounded JSON

MAX_JSON_DEPTH = 128  # torch writes about 10 levels; nested subgraphs add a few each
MAX_NODES = 20_000  # graph nodes, all subgraphs together: torch rebuilds a few hundred a second (a large
# transformer has a few thousand)


def parse_json(
    data: bytes, where: str, unique_keys: bool = True, parse_constant: Callable[[str], Any] | None = None
) -> Any:
    """JSON text parsed within bounds: nesting at most MAX_JSON_DEPTH levels and, with `unique_keys`, no key
    twice in one object (a second entry would hide the first from a check). Every JSON file slimship reads
    from a user goes through here (`parse_constant` as json.loads takes it)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ModelFileError(f"{where}: the key {key[:80]!r} appears twice in one object")
            seen[key] = value
        return seen

    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=no_duplicates if unique_keys else None,
            parse_constant=parse_constant,
        )
    except RecursionError:
        raise ModelFileError(
            f"{where}: nests deeper than JSON can be parsed (over {MAX_JSON_DEPTH} levels)"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"{where}: not valid JSON ({exc})") from None
    depth = json_depth(doc)
    if depth > MAX_JSON_DEPTH:
        raise ModelFileError(f"{where}: nests {depth} levels deep, over {MAX_JSON_DEPTH}")
    return doc


def json_depth(doc: Any) -> int:
    """How many levels of lists and objects `doc` nests (iterative: no recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            stack.extend(
                (child, level + 1) for child in (value.values() if isinstance(value, dict) else value)
            )
    return deepest


# ------------------------------------------------------------------------------------------ validation


def check_expression(text: str, where: str) -> None:
    """A symbolic shape expression (sympy srepr): known names, symbols, numbers and operators only."""
    pos = 0
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ModelFileError(
                f"{where}: refusing shape expression {text[:80]!r}: unexpected text at {pos}"
            )
        bad = _bad_expr_token(match)
        if bad:
            raise ModelFileError(f"{where}: refusing shape expression {text[:80]!r}: {bad}")
        pos = match.end()


def _bad_expr_token(match: re.Match[str]) -> str | None:
    kw, name, quoted = match.group("kw"), match.group("name"), match.group("str")
    if kw is not None and kw not in _EXPR_KEYWORDS:
        return f"unknown keyword {kw!r}"
    if name is not None and not (_SYMBOL.match(name) or name in _EXPR_FUNCTIONS):
        return f"unknown name {name!r}"
    if quoted is not None and not _QUOTED.match(quoted):
        return f"unexpected string {quoted[:40]!r}"
    if match.group("op") == "**":  # srepr writes Pow(...); a bare ** on literals is a work bomb
        return "operator '**' (srepr writes powers as Pow(...))"
    if (number := match.group("num")) is not None and len(number) > _MAX_DIGITS:
        return f"a number of {len(number)} digits"
    return None


_MAX_DIGITS = 24  # sizes and bounds fit in int64 (19 digits); floats in srepr are short too


def check_target(target: str, where: str) -> None:
    """An operator a node calls: an ATen/prims/higher-order op overload or a symbolic-int helper."""
    if not (_OP_TARGET.match(target) or target in _SYM_TARGETS):
        raise ModelFileError(
            f"{where}: refusing operator target {target[:80]!r}: only torch.ops.aten/prims/higher_order ops "
            "and symbolic-int helpers may be called by a loaded program"
        )


_STRING_RULES = {  # key in the graph JSON -> (check, what it must be)
    "expr_str": check_expression,
    "target": check_target,
    "as_operator": check_target,
}
_NAME_RULES = {
    "name": _IDENT,
    "parameter_name": FQN,
    "buffer_name": FQN,
    "tensor_constant_name": FQN,
    "custom_obj_name": FQN,
}


# Argument names under which an ATen op may take a string (a mode, an equation ...). Any other string argument
# (a file name for aten.from_file, a path) is refused: a loaded graph must not reach the file system.
STRING_ARGUMENTS = frozenset(
    "rounding_mode approximate mode padding_mode equation reduce reduction indexing side interpolation "
    "padding msg assert_msg layout_name dtype_name".split()
)
_REFUSED_OPS = re.compile(r"(^|\.)(_?from_file|_?save|_?load)(\.|$)")


def check_node_arguments(node: dict[str, Any], where: str) -> None:
    """A node's string arguments are modes and equations only; ops that touch files are refused."""
    target = str(node.get("target", ""))
    if _REFUSED_OPS.search(target.removeprefix("torch.ops.")):
        raise ModelFileError(f"{where}: refusing operator {target[:80]!r}: it reads or writes files")
    for item in node.get("inputs") or []:
        arg = item.get("arg") if isinstance(item, dict) else None
        if isinstance(arg, dict) and ({"as_string", "as_strings"} & set(arg)):
            name = str(item.get("name", ""))
            if name not in STRING_ARGUMENTS:
                raise ModelFileError(
                    f"{where}: refusing string argument {name[:40]!r} of {target[:80]!r}: a loaded program "
                    "may pass strings only as modes or equations"
                )


def _graph_nodes(doc: Any) -> Iterator[dict[str, Any]]:
    """Every node of the program's graphs (the main graph and nested subgraphs)."""
    for key, value, _ in _walk(doc, ""):
        if key == "nodes" and isinstance(value, list):
            yield from (n for n in value if isinstance(n, dict))


def check_node_count(data: bytes, where: str) -> None:
    """Before parsing: the nodes a graph JSON holds, counted from its text (torch writes '"target": ')."""
    count = data.count(b'"target": ')
    if count > MAX_NODES:
        raise ModelFileError(
            f"{where}: the program has {count} graph nodes, over the {MAX_NODES} slimship opens"
        )


def check_graph_json(doc: Any, where: str) -> None:
    """Walk the serialized program and refuse any string torch would evaluate that is not allowlisted."""
    count = sum(1 for _ in _graph_nodes(doc))
    if count > MAX_NODES:
        raise ModelFileError(
            f"{where}: the program has {count} graph nodes, over the {MAX_NODES} slimship opens"
        )
    for key, value, trail in _walk(doc, ""):
        if not isinstance(value, str):
            continue
        if key in _STRING_RULES:
            _STRING_RULES[key](value, f"{where} at {trail}")
        elif key in _NAME_RULES and not _NAME_RULES[key].match(value):
            raise ModelFileError(f"{where} at {trail}: refusing {key} {value[:80]!r}: not a plain name")
    for node in _graph_nodes(doc):
        check_node_arguments(node, f"{where} at node {str(node.get('name', '?'))[:40]!r}")
    for name in doc.get("range_constraints") or {}:
        if not _SYMBOL.match(name):
            raise ModelFileError(f"{where}: refusing range-constraint symbol {name[:80]!r}")
    for guard in doc.get("guards_code") or []:
        if not isinstance(guard, str) or not _GUARD.match(guard):
            raise ModelFileError(f"{where}: refusing guard code {str(guard)[:80]!r}: not a simple size check")


def _walk(node: Any, trail: str) -> Iterator[tuple[str, Any, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{trail}.{key}"
            yield key, value, here
            yield from _walk(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{trail}[{i}]")


def drop_free_text(doc: Any, where: str) -> None:
    """Remove node stack traces and annotations (they end up as comments in generated code)."""
    for key, value, _ in list(_walk(doc, "")):
        if key == "metadata" and isinstance(value, dict):
            for name in _DROPPED_META:
                value.pop(name, None)
    for key, value, _ in list(_walk(doc, "")):
        if key == "forward_arg_names" and isinstance(value, list):
            for name in value:
                if not isinstance(name, str) or not _IDENT.match(name):
                    raise ModelFileError(f"{where}: refusing forward argument name {str(name)[:80]!r}")


_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_STORAGE = re.compile(r"^torch\.[A-Za-z]*Storage$")


def _tensor_global(name: str) -> bool:
    """A pickle global ('module name') that torch's weights-only unpickler allows: what tensors need."""
    from torch._weights_only_unpickler import _get_allowed_globals

    module, _, attr = name.partition(" ")
    dotted = f"{'builtins' if module == '__builtin__' else module}.{attr}"
    return dotted in _get_allowed_globals() or bool(_STORAGE.match(dotted))


_STRING_PUSHES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"})
_MEMO_OPS = frozenset({"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"})


def pickle_imports(data: bytes) -> list[str]:
    """The globals a pickle would import, read from its opcodes without running it ('?' if unclear)."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.append(str(arg))
        elif op.name == "STACK_GLOBAL":
            found.append(" ".join(strings[-2:]) if len(strings) >= 2 else "?")
        if op.name in _STRING_PUSHES:
            strings.append(str(arg))
        elif op.name not in _MEMO_OPS:
            strings.clear()
    return found


def _inner_pickles(data: bytes, where: str) -> list[bytes]:
    """The .pkl members of a torch.save zip, read within a bound (declared and streamed) of 4x its size."""
    bound = 4 * len(data) + (1 << 20)
    with zipfile.ZipFile(io.BytesIO(data)) as inner:
        infos = [i for i in inner.infolist() if i.filename.endswith(".pkl")]
        if sum(i.file_size for i in inner.infolist()) > bound:
            raise ModelFileError(f"{where}: the sample-inputs archive declares more than {bound} bytes")
        out = []
        for info in infos:
            with inner.open(info) as stream:
                blob = stream.read(bound + 1)
            if len(blob) > bound:
                raise ModelFileError(f"{where}: the sample-inputs archive inflates past {bound} bytes")
            out.append(blob)
    return out


def check_sample_inputs(path: Path, members: dict[str, bytes]) -> None:
    """Refuse a file whose sample-inputs pickle (never loaded) imports more than tensors need: hostile."""
    data = members.get(_SAMPLE_INPUTS)
    if not data:
        return
    where = f"{path}: member {_SAMPLE_INPUTS!r}"
    try:
        pickles = [data]
        if zipfile.is_zipfile(io.BytesIO(data)):
            pickles = _inner_pickles(data, where)
        imports = [name for blob in pickles for name in pickle_imports(blob)]
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(
            f"{where}: unreadable sample-inputs pickle ({type(exc).__name__}: {exc})"
        ) from None
    unexpected = sorted({name for name in imports if not _tensor_global(name)})
    if unexpected:
        raise PickleRequiredError(
            f"{where}: the stored sample inputs would import {', '.join(unexpected)[:200]} when unpickled, "
            f"which can run code; refusing the file: {OPT_IN}"
        )
