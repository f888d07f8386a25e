"""Command line: a script's `Args` dataclass becomes an argparse parser, presets fill unset flags.

CleanRL uses tyro for this; tyro is not one of our dependencies, so this is the small subset we need:
- the docstring under each field is its `--help` text (read with `ast`, so it cannot drift);
- `bool` fields become `--flag/--no-flag`; list fields take one or more values and may be repeated, the
  values adding up (`--crop-size 512 512`, `--fd-classes car person` = `--fd-classes car --fd-classes person`);
  `Literal[...]` fields get choices; `Optional[X]` fields accept `none`;
- resolution order: an explicit flag, then the chosen `--preset`, then the dataclass default.
User mistakes raise `UserError`; `guard()` prints them as one line and exits 2, never a traceback.
"""
import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing

_UNSET = object()


class UserError(Exception):
    """A mistake in the command line, the data or a file the user gave: printed as one line, exit 2."""


def field_docs(cls) -> dict:
    """Map field name -> the string literal written right under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _converter(tp, optional):
    def convert(text):
        if optional and text.lower() == "none":
            return None
        return tp(text)
    convert.__name__ = getattr(tp, "__name__", "value")
    return convert


def build_parser(cls, presets: dict, description: str = "") -> argparse.ArgumentParser:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.append_fields = set()  # repeatable flags start at None instead of the unset marker
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.metadata.get("runtime"):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = [f"default: {default}"] + [f"{p}: {v[f.name]}" for p, v in presets.items() if f.name in v]
        help_text = f"{docs.get(f.name, '')} ({'; '.join(shown)})".replace("%", "%%")
        kw = dict(default=_UNSET, help=help_text, dest=f.name)
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif origin is typing.Literal:
            parser.add_argument(flag, choices=list(typing.get_args(tp)), **kw)
        elif origin is list:
            parser.add_argument(flag, action="extend", nargs="+", type=_converter(typing.get_args(tp)[0], optional),
                                metavar="VALUE", **{**kw, "default": None})
            parser.append_fields.add(f.name)
        else:
            parser.add_argument(flag, type=_converter(tp, optional), **kw)
    return parser


def parse_args(cls, presets: dict, argv=None, description: str = ""):
    """Parse argv into `cls`: explicit flag > `presets[args.preset]` > dataclass default."""
    parser = build_parser(cls, presets, description)
    ns = vars(parser.parse_args(argv))
    preset_name = ns.get("preset")
    if preset_name is _UNSET or preset_name is None:
        preset_name = next(f.default for f in dataclasses.fields(cls) if f.name == "preset")
    chosen = presets.get(preset_name, {})
    values = {}
    for f in dataclasses.fields(cls):
        given = ns.get(f.name, _UNSET)
        if given is not _UNSET and not (given is None and f.name in parser.append_fields):
            if isinstance(given, list) and None in given and given != [None]:
                parser.error(f"--{f.name.replace('_', '-')}: 'none' cannot be combined with other values")
            values[f.name] = None if given == [None] else given  # `--crop-size none`
        elif f.name in chosen:
            values[f.name] = chosen[f.name]
    values["preset"] = preset_name
    args = cls(**values)
    # the fields the user typed (not filled by a preset or default): an explicit choice beats what a weights
    # file implies (common.checkpoint); not a dataclass field, so config.json and checkpoints never carry it
    args.given = frozenset(f.name for f in dataclasses.fields(cls) if ns.get(f.name, _UNSET) is not _UNSET
                           and not (ns.get(f.name) is None and f.name in parser.append_fields))
    return args


def guard(main):
    """Run `main()`; turn a UserError (also one raised inside a DataLoader worker) into one line and exit 2."""
    try:
        main()
    except UserError as e:
        # a worker's error arrives re-wrapped with its traceback; its last line holds the message
        message = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        message = message.split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def imply(args, implied: dict, source: str):
    """Apply the flags a weights file implies (say, a release made with 2 ASPP branches and Caffe input):
    a flag the user typed wins, with a warning when it contradicts the file; fields the script does not have
    are skipped. Returns the applied {field: value} (for config.json and results.json)."""
    applied = {}
    for name, value in implied.items():
        if not hasattr(args, name):
            continue
        if name in getattr(args, "given", ()):
            if getattr(args, name) != value:
                flag = "--" + name.replace("_", "-")
                print(f"warning: {flag} {getattr(args, name)} contradicts {source}, which implies {value}; "
                      f"using {getattr(args, name)} as asked", file=sys.stderr, flush=True)
            continue
        setattr(args, name, value)
        applied[name] = value
    return applied
