"""lens-train --config configs/NAME.py --workdir DIR [--config.FIELD=VALUE ...]

Trains (or resumes, when DIR holds checkpoints) the Lens denoiser. Any config field can be
overridden on the command line, e.g. --config.num_steps=200 --config.optimizer.lr=1e-4
--config.data.path=/data/shapes. Every field, its value and what it means:
lens-train --config configs/NAME.py --help_config. lens-train export ... exports saved weights
to a diffusers folder (lens-train export --help); lens-train compile --config CFG --topology
v5p-128 compiles the step for a TPU slice from any host and says whether it fits
(lens-train compile --help, docs/tpu.md).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py); override fields with --config.FIELD=VALUE; "
    "--help_config lists every field with its value and meaning.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints/, metrics.jsonl, tensorboard/, samples/, config.json. "
    "An existing run there is resumed from its newest readable checkpoint.")


def _quiet_logs() -> None:
    """Our INFO messages to stderr; the libraries' (orbax, grain, absl) only from WARNING up."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("lens_jax")
    ours.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours.addHandler(handler)
    ours.propagate = False


def _run(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    _quiet_logs()
    from lens_jax.errors import (CheckpointMismatchError, CheckpointUnusableError,
                                 ExecutableMismatchError, NonFiniteLossError, WorkdirLocked)
    from lens_jax.train.loop import train

    try:
        train(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as e:
        print(f"lens-train: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except (CheckpointMismatchError, CheckpointUnusableError, ExecutableMismatchError,
            WorkdirLocked) as e:
        print(f"lens-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] == "export":
        from lens_jax.train import export

        sys.exit(export.main(argv[2:]))
    if len(argv) > 1 and argv[1] == "compile":
        from lens_jax.train import compile as compile_lib

        sys.exit(compile_lib.main(argv[2:]))
    from lens_jax.train import config_help

    config_help.main_hook(argv[1:])  # --help_config; an unknown --config.FIELD in one line
    # ``--help`` lists the key flags of the program's main module; under a console script that is
    # the wrapper, not this module, so register ours for it (and say how to export).
    for flag in ("config", "workdir"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag])
    main_module = sys.modules.get("__main__")
    if main_module is not None and not main_module.__doc__:
        main_module.__doc__ = __doc__  # absl prints it as the usage text
    app.run(_run, argv=argv)


if __name__ == "__main__":
    main()
