"""Config files with ``--config.FIELD=VALUE`` overrides, for commands that are not absl apps.

``lens-train`` reads ``--config FILE[:ARG]`` and ``--config.FIELD=VALUE`` through ml_collections'
``config_flags``. ``load`` runs that same parser on a private flag set, so the demo and the ablation
take the same two flags with the same type rules (``--config.num_steps=200``,
``--config.data.path DIR``): one way to configure every command.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """``argv`` -> ``(config file or None, --config.FIELD overrides, the other arguments)``.

    Both spellings of a value are taken: ``--config=FILE`` / ``--config FILE`` and
    ``--config.FIELD=VALUE`` / ``--config.FIELD VALUE``."""
    path, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name == "--config" or name.startswith("--config."):
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            elif not eq and name == "--config":
                raise ValueError("--config needs a file (--config FILE or --config=FILE)")
            if name == "--config":
                path = value
            else:
                overrides.append(f"{name}={value}" if (eq or value) else name)
        else:
            rest.append(arg)
        i += 1
    return path, overrides, rest


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field of ``config`` as a dotted name (``data.path``, ``optimizer.lr``, ...)."""
    names = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            names += field_names(value, name + ".")
        else:
            names.append(name)
    return names


def unknown_field_message(config: ml_collections.ConfigDict, name: str) -> str | None:
    """``None`` if ``name`` (``optimizer.lr``) is a field or section of ``config``, else one line
    naming it and the nearest fields (of its own section when the section exists)."""
    fields = field_names(config)
    sections = {n.rsplit(".", 1)[0] for n in fields if "." in n}
    if name in fields or name in sections:
        return None
    section, _, leaf = name.rpartition(".")
    siblings = [n.rpartition(".")[2] for n in fields if n.rpartition(".")[0] == section]
    if siblings:
        near = [f"{section}.{n}" if section else n
                for n in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.6)]
    else:
        near = difflib.get_close_matches(name, fields, n=2, cutoff=0.6)
    hint = (f"; did you mean {' or '.join('--config.' + n for n in near)}?" if near
            else "; lens-train --config FILE --help_config lists every field")
    return f"--config.{name}: no such config field{hint}"


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``get_config()`` of ``path`` (``FILE`` or ``FILE:ARG``) with ``overrides`` applied.

    ``overrides``: ``--config.FIELD=VALUE`` / ``--config.FIELD VALUE`` words as on a command line.
    Errors are ``ValueError`` with one line naming the flag (and the closest fields for a typo)."""
    file = path.rsplit(":", 1)[0] if ":" in path[2:] else path  # FILE:ARG (not a drive letter)
    if not os.path.isfile(file):
        raise ValueError(f"--config {file}: no such file")
    argv = ["lens", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as e:
        raise ValueError(str(e).splitlines()[0]) from None
    except (AttributeError, KeyError):  # an override of a field the config does not have
        base = load(path)
        names = [o.partition("=")[0][len("--config."):] for o in overrides]
        messages = [m for m in (unknown_field_message(base, n) for n in names) if m]
        raise ValueError(messages[0] if messages else f"--config {path}: bad override") from None
    config = values.config
    try:
        config.keys()  # config_flags defers a load failure (a missing file, a syntax error) to here
    except OSError as e:
        raise ValueError(f"--config {path}: " + " ".join(str(e).split())[:500]) from None
    return config
