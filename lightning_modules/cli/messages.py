"""Config errors as one paragraph that leads with the offending key and value (`lead_with_key`)."""

from __future__ import annotations

import difflib
import importlib
import re
import sys

from jsonargparse._common import debug_mode_active
from lightning.pytorch.cli import LightningArgumentParser

from datamodules.utils.errors import USER_ERROR_EXIT_CODE


# ---- config errors: one paragraph that leads with the key -----------------------------------------

NOISE = ("Given value type:", "Given value:", "- Expected a <class 'NoneType'>")


def concise(message: str) -> str:
    """jsonargparse's nested error text as one paragraph, keeping every line that names a key or value."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(NOISE))


def _tree(message: str) -> list[tuple[str, list]]:
    """jsonargparse's indented error text as (line, children) nodes; a `- ` bullet's text nests as indented."""
    root: list[tuple[str, list]] = []
    stack: list[tuple[int, list]] = [(-1, root)]
    for raw in message.splitlines():
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip())
        if text.startswith("- "):
            text, indent = text[2:], indent + 2
        while stack[-1][0] >= indent:
            stack.pop()
        node: tuple[str, list] = (text, [])
        stack[-1][1].append(node)
        stack.append((indent, node[1]))
    return root


def _subtree_text(nodes: list[tuple[str, list]]) -> str:
    return "\n".join(text + "\n" + _subtree_text(children) for text, children in nodes)


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _did_you_mean(word: str, options, prefix: str = "") -> str:
    """` (did you mean X?)` for the closest of `options` (case-insensitive: Adamw → AdamW), or ''."""
    by_lower = {option.lower(): option for option in options}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{by_lower[match[0]]}?)" if match else ""


def _options_of(class_path: str | None) -> list[str]:
    """The init arguments jsonargparse accepts for `class_path` (following **kwargs up the MRO)."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    cls = _import(class_path) if class_path else None
    try:
        return [p.name for p in get_signature_parameters(cls, logger=False)] if cls is not None else []
    except Exception:  # best effort: a suggestion is optional
        return []


def _annotation_of(owner: tuple[str, str] | None):
    if owner is None:
        return None
    from jsonargparse._parameter_resolvers import get_signature_parameters

    cls = _import(owner[0])
    try:
        params = get_signature_parameters(cls, logger=False) if cls is not None else []
    except Exception:
        return None
    return next((p.annotation for p in params if p.name == owner[1]), None)


def _subclass_names(annotation) -> list[str]:
    """The names of `annotation`'s subclasses (what a short class_path may name); the class itself if it has none."""
    if not isinstance(annotation, type):
        return []
    found, todo = set(), list(annotation.__subclasses__())
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return sorted(found) or [annotation.__name__]


def _type_name(text: str) -> str:
    """`<class 'float'>` → `a float`; `typing.Literal['a', 'b']` → `one of 'a', 'b'`."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal[1]}"
    plain = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", text)
    name = {"NoneType": "null"}.get(plain[1], plain[1]) if plain else text
    return name if name == "null" else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _expected(types: list[str]) -> str:
    """`expected a bool or an int`; Literal alternatives merge into one `one of ...` list."""
    literals = [t[len("one of "):] for t in types if t.startswith("one of ")]
    others = [t for t in types if not t.startswith("one of ")]
    parts = ([f"one of {', '.join(literals)}"] if literals else []) + others
    return "expected " + " or ".join(parts)


def _leaves(nodes: list[tuple[str, list]], path: tuple[str, ...], cls: str | None,
            owner: tuple[str, str] | None, out: list[tuple[int, str]]) -> None:
    """Collect (priority, 'key: what is wrong') for each recognized failure in the error tree."""

    def key(*more: str) -> str:
        return ".".join((*path, *(("init_args",) if cls and more else ()), *more))

    for text, children in nodes:
        callable_class = re.search(r"expects a function or a callable class: (.*)$", text)
        if callable_class:  # an optimizer / scheduler factory given as class_path + init_args
            got = re.search(r"Got value: Namespace\(class_path='([^']+)'", text + "\n" + _subtree_text(children))
            inner_path = (*path, *(("init_args",) if cls else ()))
            _leaves([(callable_class[1], children)], inner_path, got[1] if got else None, owner, out)
            continue
        parser_key = re.fullmatch(r'Parser key "([^"]+)":', text)
        if parser_key:
            inner = tuple(key(parser_key[1]).split(".")) if cls else (*path, parser_key[1])
            found: list[tuple[int, str]] = []
            _leaves(children, inner, None, (cls, parser_key[1]) if cls else None, found)
            union = _plain_union(children)  # `seed_everything`, `precision`, a float | Tensor: list what it takes
            if union and all(priority >= 3 for priority, _ in found):
                out.append((2, f"{'.'.join(inner)}: {union}"))
            else:
                out.extend(found)
            continue
        problem = re.fullmatch(r"Problem with given class_path '([^']+)':", text)
        if problem:
            _leaves(children, path, problem[1], owner, out)
            continue
        option = re.match(r"Option '([^']+)' is not accepted", text)
        if option:
            out.append((0, f"{key(option[1])}: no such option of {cls}{_did_you_mean(option[1], _options_of(cls))}"))
            continue
        required = re.match(r"the following arguments are required: (.+)", text)
        if required:
            out.extend((0, f"{key(name.strip())}: required, not given") for name in required[1].split(","))
            continue
        missing = re.search(r"module '([^']+)' has no attribute '([^']+)'", text)
        if missing:
            module = sys.modules.get(missing[1])  # imported by jsonargparse's attempt; nothing new is imported
            names = [n for n in dir(module) if isinstance(getattr(module, n, None), type)] if module else []
            out.append((1, f"{'.'.join(path)}: no class {missing[1]}.{missing[2]}"
                           f"{_did_you_mean(missing[2], names, missing[1] + '.')}"))
            continue
        wrong = re.match(r"Expected a (.+?)\. Got value: (.*)$", text, re.S)
        if wrong:
            out.append((2, f"{'.'.join(path)}: {_expected([_type_name(wrong[1])])}, got {wrong[2]!r}"))
            continue
        not_class = re.fullmatch(r"Expected a dot import path string: (.*)", text)
        if not_class and owner is not None:
            names = _subclass_names(_annotation_of(owner))
            hint = _did_you_mean(not_class[1], names) or (f" (one of {', '.join(names)})" if names else "")
            out.append((3, f"{'.'.join(path)}: {not_class[1]!r} is not a class or import path{hint}"))
            continue
        _leaves(children, path, cls, owner, out)


def _plain_union(children: list[tuple[str, list]]) -> str | None:
    """`expected a bool or an int, got 'abc'` for a union whose alternatives are all plain types, else None."""
    errors = next((kids for text, kids in children if text == "Errors:"), None)
    value = next((text[len("Given value: "):] for text, _ in children if text.startswith("Given value: ")), None)
    if not errors or value is None or any(kids or not text.startswith("Expected a ") for text, kids in errors):
        return None
    types = [_type_name(text[len("Expected a "):]) for text, _ in errors
             if not text.startswith(("Expected a path but", "Expected a dot import path"))]
    return f"{_expected(types)}, got {value.split('. Got value: ')[0]!r}" if types else None


def _option_keys(parser) -> list[str]:
    return [a.dest for a in getattr(parser, "_actions", []) if isinstance(a.dest, str) and a.dest != "help"]


def lead_with_key(message: str, parser) -> str | None:
    """jsonargparse's error as `key: what is wrong` (with a did-you-mean), or None when it is not recognized."""
    unknown = re.fullmatch(r"unrecognized arguments: --([^=\s]+)(?:=\S*)?.*", message, re.S)
    sub_unknown = re.fullmatch(r"Subcommand '(\w+)' does not accept options? '([^']+)'.*", message, re.S)
    if unknown or sub_unknown:
        if unknown:
            name, options = unknown[1], _option_keys(parser)
        else:
            action = getattr(parser, "_subcommands_action", None)
            subparser = getattr(action, "_name_parser_map", {}).get(sub_unknown[1]) if action else None
            name, options = sub_unknown[2], _option_keys(subparser)
        return f"{name}: no such option{_did_you_mean(name, options)}"
    found: list[tuple[int, str]] = []
    _leaves(_tree(message), (), None, None, found)
    return min(found, key=lambda item: item[0])[1] if found else None


class ConciseParser(LightningArgumentParser):
    """Config errors as one paragraph leading with the key (no 50-line usage dump); JSONARGPARSE_DEBUG=1 for all."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        try:
            paragraph = lead_with_key(message, self)
        except Exception:  # the fallback below always names the key; a bug here must not hide the user's error
            paragraph = None
        sys.stderr.write(f"error: {paragraph or concise(message)}\n"
                         "(run with --help for every option and its description)\n")
        self.exit(USER_ERROR_EXIT_CODE)
