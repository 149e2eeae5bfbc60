"""Every exception lens_jax defines, in one place: who raises it and what to do about it.

Each message names the file, key, shape or flag at fault; the classes only say which kind of
failure it is, so that a command (or a caller) can catch that kind and nothing else: the
command-line tools print these as a one-line error and exit with a non-zero status, without a
traceback. Everything else is one of Python's own exceptions (``ValueError``,
``FileNotFoundError``, ``OSError``, ...).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the loader expects.

    Raised by ``lens_jax.checkpoints`` (``load_transformer``, ``load_vae``,
    ``load_text_encoder``, the safetensors reader and the key maps), ``lens-convert`` and
    ``LensPipeline.from_pretrained``: a missing or unreadable ``config.json``, a tensor missing,
    unexpected or of the wrong shape, a pickle file where safetensors were expected. The message
    names the file and the key; convert the checkpoint again, or point at the right folder.
    """


class RecordError(ValueError):
    """A record (or a record path) is not what the lens record format expects.

    Raised by ``lens_jax.data.records`` (decoding, listing and opening shards),
    ``lens_jax.data.tfds_builder`` (``tfds:`` specs, datasets not found) and the dataset builder
    (``lens-data build``). The message names the shard, record or spec; rebuild the records with
    ``lens-data build``, or fix the path.
    """


class CaptionError(RuntimeError):
    """The captioning endpoint refuses every request (HTTP 401, 403 or 404: a wrong key, model or
    URL), so ``lens-data caption`` stops; what was captioned so far stays in its cache.

    Raised by ``lens_jax.data.caption``. Check ``--endpoint``, ``--model`` and the variable named by
    ``--api-key-env``, then run the same command again: it resumes from the cache.
    """


class OutputError(ValueError):
    """An output path would destroy an input or files the command did not write.

    Raised by ``lens_jax.output_guard`` before any write, for every command that writes a folder.
    Nothing was written; choose another output path (or remove the files the message lists).
    """


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stopped without saving.

    Raised by ``lens_jax.train.loop``; ``lens-train`` exits with status 3. The last good
    checkpoint is left in place: resume from it with a lower learning rate, or look for bad data.
    """


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit this run's config; nothing was changed.

    Raised by ``lens_jax.train.checkpoint`` when a run resumes (``lens-train`` exits with status
    2, as for the next two). Resume with the config the run was
    started with, or start a new run from those weights (``--config.init_from=run:WORKDIR``).
    """


class ExecutableMismatchError(ValueError):
    """A saved training step (``lens-train compile --save-executable``) was compiled for another
    config, mesh, device order, number of processes or jax version than this run's.

    Raised by ``lens_jax.train.executable`` before the first step (``lens-train`` exits with status
    2), naming each difference. Compile the step again for this run, or drop
    ``--config.compiled_step_path`` to let the run compile its own.
    """


class CheckpointUnusableError(RuntimeError):
    """A run's checkpoints exist but none can be read; nothing was changed.

    Raised by ``lens_jax.train.checkpoint`` when a run resumes. Move the checkpoints away to start
    again from step 0, or point ``--config.init_from`` at another run.
    """


class WorkdirLocked(RuntimeError):
    """The run directory is held by another live process.

    Raised by ``lens_jax.train.workdir_lock`` when ``lens-train`` (or ``lens-train export``)
    starts. Wait for the other run to finish, or use another workdir; the message names the
    holder (host, process, command).
    """


class LockLost(RuntimeError):
    """This process's lock was taken over by another process (it stalled past the timeout).

    Raised by ``lens_jax.train.workdir_lock`` while a run writes. Stop one of the two runs; the
    one that still holds the lock goes on.
    """


class LoraFileError(ValueError):
    """A LoRA file cannot be read or does not fit the model.

    Raised by ``lens_jax.lora.files`` (``read_lora``, ``merge_lora``), hence by
    ``LensPipeline.load_lora`` and ``lens-sample --lora``: keys that are neither PEFT nor kohya LoRA
    keys, a module that cannot take a LoRA, a block the model does not have, an ``A`` without its
    ``B``, or shapes that do not match the weight. The message names the keys and shapes; check
    that the LoRA was trained for this model (Lens / Lens-Turbo share one architecture).
    """
