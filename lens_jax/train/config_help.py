"""What lens-train says about its config: ``--help_config`` and misspelled ``--config.FIELD``.

- ``describe(config)``: every field as ``name = value  # comment``, the comment taken from where
  the default is set (``train_config``, ``transformer_config``, ``default_data_config``), so
  each field is documented once, in code.
- ``check_overrides(argv)``: loads the ``--config`` file and checks every ``--config.FIELD``
  of ``argv`` before absl parses them (which ends in a long chained traceback); an unknown field
  becomes one line with the nearest names (``difflib``).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import re
import sys
from collections.abc import Sequence

import ml_collections

# ``c.FIELD = VALUE  # comment`` and its ``#   continued`` lines, in the functions that set
# the defaults.
_ASSIGN = re.compile(r"^\s*c\.([\w.]+)\s*=\s*.*?#\s?(.*)$")
_CONTINUED = re.compile(r"^\s*#\s+(.*)$")


def _comments_of(function, prefix: str = "") -> dict[str, str]:
    comments: dict[str, str] = {}
    last = None
    for line in inspect.getsource(function).splitlines():
        m = _ASSIGN.match(line)
        if m:
            last = prefix + m.group(1)
            comments[last] = m.group(2).strip()
            continue
        m = _CONTINUED.match(line)
        if m and last is not None and line.lstrip().startswith("#   "):
            comments[last] += " " + m.group(1).strip()
        else:
            last = None if not line.strip().startswith("c.") else last
    return comments


def field_comments() -> dict[str, str]:
    """``{"optimizer.lr": "...", "model.num_layers": "...", "data.seed": "...", ...}``."""
    from lens_jax.data.pipeline import default_data_config
    from lens_jax.models.config import transformer_config
    from lens_jax.train.config import train_config

    comments = _comments_of(train_config)
    comments.update(_comments_of(transformer_config, "model."))
    comments.update(_comments_of(default_data_config, "data."))
    return comments


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def describe(config: ml_collections.ConfigDict) -> str:
    """Every field of ``config``: ``name = value`` and its comment (plain text)."""
    from lens_jax.models.config import transformer_config
    from lens_jax.train.config import train_config

    comments = field_comments()
    defaults = dict(_leaves(train_config(transformer_config())))
    lines = ["Config fields (override any with --config.NAME=VALUE): NAME = this config's value, "
             "[the library default where it differs], what it means"]
    for name, value in _leaves(config):
        text = f"  {name} = {value!r}"
        if name in defaults and defaults[name] != value:
            text += f" [{defaults[name]!r}]"
        comment = comments.get(name, "")
        lines.append(f"{text:<48}  {comment}" if comment else text)
    return "\n".join(lines)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:ARG]`` -> its ``get_config([ARG])`` (as ``config_flags`` does)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_lens_train_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--config {path}: not a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    return module.get_config(arg) if arg else module.get_config()


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def unknown_field_message(config: ml_collections.ConfigDict, name: str) -> str | None:
    """``None`` if ``name`` (``optimizer.lr``) is a field of ``config``, else the one-line error."""
    fields = [n for n, _ in _leaves(config)]
    sections = {n.rsplit(".", 1)[0] for n in fields if "." in n}
    if name in fields or name in sections:
        return None
    section, _, leaf = name.rpartition(".")
    siblings = [n.rpartition(".")[2] for n in fields if n.rpartition(".")[0] == section]
    if siblings:  # a known section: the nearest field names in it
        near = [f"{section}.{n}" if section else n
                for n in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.6)]
    else:
        near = difflib.get_close_matches(name, fields, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join('--config.' + n for n in near)}?" if near else (
        "; lens-train --config FILE --help_config lists every field")
    return f"--config.{name}: no such config field{hint}"


def check_overrides(argv: Sequence[str]) -> str | None:
    """The one-line error for the first unknown ``--config.FIELD`` of ``argv`` (``None``: all
    known, or no ``--config`` to check against)."""
    names = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    spec = _config_spec(argv)
    if not names or spec is None:
        return None
    try:
        config = load_config_file(spec)
    except ValueError as e:
        return str(e)
    for name in names:
        message = unknown_field_message(config, name)
        if message:
            return message
    return None


def main_hook(argv: Sequence[str]) -> None:
    """Run before absl parses ``argv``: ``--help_config`` prints the fields and exits 0; an
    unknown ``--config.FIELD`` prints one line and exits 2."""
    if "--help_config" in argv or "--helpconfig" in argv:
        spec = _config_spec(argv)
        if spec is None:
            from lens_jax.models.config import transformer_config
            from lens_jax.train.config import train_config

            config = train_config(transformer_config())
            print("(no --config given: the library defaults)")
        else:
            try:
                config = load_config_file(spec)
            except ValueError as e:
                print(f"lens-train: error: {e}", file=sys.stderr)
                sys.exit(2)
        print(describe(config))
        sys.exit(0)
    message = check_overrides(argv)
    if message:
        print(f"lens-train: error: {message}", file=sys.stderr)
        sys.exit(2)
