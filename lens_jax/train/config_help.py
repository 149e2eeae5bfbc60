"""What lens-train says about its config: ``--help_config`` and misspelled ``--config.FIELD``.

- ``describe(config)``: every field as ``name = value  # comment``, the comment taken from where
  the default is set (``train_config``, ``transformer_config``, ``default_data_config``), so
  each field is documented once, in code.
- ``check_overrides(argv)``: loads the ``--config`` file and checks every ``--config.FIELD``
  of ``argv`` before absl parses them (which ends in a long chained traceback); an unknown field
  becomes one line with the nearest names (``config_files.unknown_field_message``).
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Sequence

import ml_collections

from lens_jax.train import config_files

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


def describe(config: ml_collections.ConfigDict) -> str:
    """Every field of ``config``: ``name = value`` and its comment (plain text)."""
    from lens_jax.models.config import transformer_config
    from lens_jax.train.config import train_config

    comments = field_comments()
    base = train_config(transformer_config())
    defaults = {n: base[n] for n in config_files.field_names(base)}
    lines = ["Config fields (override any with --config.NAME=VALUE): NAME = this config's value, "
             "[the library default where it differs], what it means"]
    for name in config_files.field_names(config):
        value = config[name]
        text = f"  {name} = {value!r}"
        if name in defaults and defaults[name] != value:
            text += f" [{defaults[name]!r}]"
        comment = comments.get(name, "")
        lines.append(f"{text:<48}  {comment}" if comment else text)
    return "\n".join(lines)


def check_overrides(argv: Sequence[str]) -> str | None:
    """The one-line error for the first unknown ``--config.FIELD`` of ``argv`` (``None``: all
    known, or no ``--config`` to check against)."""
    spec, overrides, _ = config_files.split_config_args(argv)
    if not overrides or spec is None:
        return None
    try:
        config = config_files.load(spec)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    for name in (o.partition("=")[0][len("--config."):] for o in overrides):
        message = config_files.unknown_field_message(config, name)
        if message:
            return message
    return None


def main_hook(argv: Sequence[str]) -> None:
    """Run before absl parses ``argv``: ``--help_config`` prints the fields and exits 0; an
    unknown ``--config.FIELD`` prints one line and exits 2."""
    if "--help_config" in argv or "--helpconfig" in argv:
        spec = config_files.split_config_args(argv)[0]
        if spec is None:
            from lens_jax.models.config import transformer_config
            from lens_jax.train.config import train_config

            config = train_config(transformer_config())
            print("(no --config given: the library defaults)")
        else:
            try:
                config = config_files.load(spec)
            except (ValueError, FileNotFoundError) as e:
                print(f"lens-train: error: {e}", file=sys.stderr)
                sys.exit(2)
        print(describe(config))
        sys.exit(0)
    message = check_overrides(argv)
    if message:
        print(f"lens-train: error: {message}", file=sys.stderr)
        sys.exit(2)
