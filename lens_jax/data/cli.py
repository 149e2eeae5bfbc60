"""``lens-data``: dataset tools for lens records.

Subcommands:
  build         image folder + captions -> sharded lens records
  inspect       counts, caption-length and resolution statistics, a few examples
  synth-shapes  synthetic coloured-shapes dataset with ground-truth layouts
  tfds-prepare  prepare the ``lens_records`` TFDS dataset (ArrayRecord, no TensorFlow needed)
  caption       re-caption records densely with an OpenAI-compatible vision-language endpoint

Each subcommand is one ``add_*`` function registered in ``SUBCOMMANDS``; a new one only has to
append its own ``add_*(subparsers)`` that sets ``func`` on its parser.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import textwrap
from collections.abc import Callable, Sequence

from lens_jax.errors import CaptionError, RecordError
from lens_jax.data.synth_shapes import ASPECTS, PLACEMENTS, SHORT_CAPTION_STYLES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------
# build


def add_build(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="convert a folder of images with captions to sharded lens records",
        description=textwrap.dedent("""\
            Convert a folder of images (.jpg/.jpeg/.png/.webp, searched recursively) with captions
            into sharded lens records (ArrayRecord). Image bytes are stored unchanged; PIL decodes
            every image once to reject corrupt files and to read width and height. Captions come
            from --captions (JSONL with keys path, caption[, short_caption][, metadata], or CSV/TSV
            with columns path, caption[, short_caption], header optional, one row per line) or,
            without it, from text files beside each image: IMG.txt (or IMG.jpg.txt) and
            optionally IMG.short.txt. Bad inputs never stop the build: images that are missing,
            corrupt, unsupported or larger than the training pipeline accepts, captions that are
            empty or not UTF-8, and malformed rows are skipped; the report counts them by reason
            and names them (file and line for rows). With fewer images than --num-shards, one
            shard per image is written (no empty shards). --out may not contain, equal or lie
            inside an input; --overwrite replaces only a folder of lens records.

            Other inputs (instead of --images; every path but --tfds may be gs://): WebDataset tar shards
            as img2dataset writes them (--webdataset 'shards/{00000..00099}.tar': KEY.jpg/png/
            webp with the caption in KEY.txt, or in a field of KEY.json with --caption-field,
            optionally KEY.short.txt); parquet files with image bytes and caption columns
            (--parquet, --image-column, --caption-column; Hugging Face's Image struct
            {bytes, path} is read too); a Hugging Face dataset saved with save_to_disk
            (--hf-dataset, read with pyarrow); a TFDS dataset prepared as ArrayRecord (--tfds
            tfds:NAME[:SPLIT][@DATA_DIR], features by flattened name). Unreadable files, tar
            members and records, samples without an image and rows without image bytes are
            skipped and counted too.

            The build is an Apache Beam pipeline: --runner DirectRunner (default) on this machine
            in --workers processes, or DataflowRunner / FlinkRunner / SparkRunner with their
            pipeline options (any flag not listed here is passed to Beam). The records, the
            report and the shard layout are the same on every runner and with --runner local
            (no Beam)."""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", help="folder of images (searched recursively)")
    inputs.add_argument("--webdataset", nargs="+", metavar="PATTERN",
                        help="WebDataset tar shards: files, globs or brace patterns "
                             "('shards/{00000..00099}.tar'; quote them)")
    inputs.add_argument("--parquet", nargs="+", metavar="FILE",
                        help="parquet files (or globs / brace patterns), one image per row")
    inputs.add_argument("--hf-dataset", metavar="DIR",
                        help="a Hugging Face dataset saved with save_to_disk (Dataset or "
                             "DatasetDict folder; for one on the Hub, pass its parquet files to "
                             "--parquet)")
    inputs.add_argument("--tfds", metavar="SPEC",
                        help="a TFDS dataset prepared as ArrayRecord: tfds:NAME[:SPLIT][@DATA_DIR] "
                             "(features by flattened name: --image-column image, "
                             "--caption-column e.g. captions/text)")
    p.add_argument("--caption-field", default=None,
                   help="--webdataset: take the caption from this field of KEY.json (default: "
                        "KEY.txt, else the json's 'caption')")
    p.add_argument("--image-column", default="image",
                   help="--parquet/--hf-dataset/--tfds: column (feature) of encoded image bytes "
                        "(default image)")
    p.add_argument("--caption-column", default="caption",
                   help="--parquet/--hf-dataset/--tfds: caption column (default caption)")
    p.add_argument("--short-caption-column", default=None,
                   help="--parquet/--hf-dataset/--tfds: short caption column (default: none)")
    p.add_argument("--id-column", default="key",
                   help="--parquet/--hf-dataset/--tfds: column of record ids, used when present "
                        "(default key, img2dataset's; otherwise FILE:ROW or NAME:INDEX)")
    p.add_argument("--hf-split", default="train",
                   help="--hf-dataset: the split of a DatasetDict (default train)")
    p.add_argument("--captions", default=None,
                   help="JSONL/CSV/TSV file of path, caption[, short_caption]; paths relative to "
                        "--images or absolute (default: IMG.txt / IMG.short.txt beside each image)")
    p.add_argument("--out", required=True, help="output folder for the shards (must not exist "
                                                "unless --overwrite)")
    p.add_argument("--num-shards", type=_positive_int, default=1,
                   help="number of ArrayRecord shards, examples go round-robin (default 1)")
    p.add_argument("--workers", type=_positive_int, default=_default_workers(),
                   help="processes reading and checking images (DirectRunner and --runner "
                        "local; default: CPU count, at most 8)")
    p.add_argument("--source", default="",
                   help="source tag stored in every record (default: the name of the input "
                        "folder, or of the folder holding the first input file)")
    p.add_argument("--dedup", action="store_true",
                   help="drop images whose bytes (sha256) equal an earlier image's; the report "
                        "counts them as 'duplicate image'")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--runner local)")
    p.add_argument("--runner", default="DirectRunner",
                   help="Apache Beam runner (default DirectRunner: --workers processes on this "
                        "machine; DataflowRunner, FlinkRunner, SparkRunner, ...: any other Beam "
                        "pipeline option, e.g. --project, --region, --temp_location, "
                        "--setup_file, is passed to the pipeline as given), or 'local': the same "
                        "records with a process pool and a progress bar, without Beam")
    p.set_defaults(func=run_build, accepts_pipeline_args=True)


def check_records_output(args: argparse.Namespace, inputs: dict, command: str) -> None:
    """--out may not overlap an input; --overwrite replaces only a folder of lens records."""
    from lens_jax import output_guard
    from lens_jax.data.records import OUTPUT_PATTERNS

    output_guard.check_output(args.out, inputs)
    if args.overwrite:
        output_guard.check_replaceable(args.out, OUTPUT_PATTERNS, command)


def build_inputs(args: argparse.Namespace):
    """``(parts, read_part, inputs, name)`` of ``lens-data build``: the input in parts (a file,
    or a slice of an image folder) that ``read_part`` turns into items in order, the input paths
    (for the output checks) and a name for errors and the default source tag."""
    import functools

    from lens_jax.data import beam_build, build_inputs
    from lens_jax.data.build import folder_items

    if args.images is not None:
        return (beam_build.chunks(folder_items(args.images, args.captions)), beam_build.read_list,
                {"--images": args.images, "--captions": args.captions}, args.images)
    if args.captions:
        raise ValueError("--captions goes with --images only")
    if args.webdataset:
        files = build_inputs.expand_paths(args.webdataset, "--webdataset")
        return (files, functools.partial(beam_build.read_files, build_inputs.iter_webdataset,
                                         caption_field=args.caption_field),
                {f"--webdataset {p}": p for p in files}, os.path.dirname(files[0]))
    columns = dict(image_column=args.image_column, caption_column=args.caption_column,
                   short_column=args.short_caption_column, id_column=args.id_column)
    if args.parquet:
        files = build_inputs.expand_paths(args.parquet, "--parquet")
        return (files, functools.partial(beam_build.read_files, build_inputs.iter_parquet, **columns),
                {f"--parquet {p}": p for p in files}, os.path.dirname(files[0]))
    if args.tfds:
        from lens_jax.data.tfds_builder import parse_spec

        name, _, data_dir = parse_spec(args.tfds)
        paths = [p for p in (data_dir, name if os.path.isdir(name) else None) if p]
        return ([args.tfds], functools.partial(build_inputs.iter_tfds, **columns),
                {f"--tfds {p}": p for p in paths}, name)
    return ([args.hf_dataset], functools.partial(build_inputs.iter_hf_dataset, split=args.hf_split,
                                                 **columns),
            {f"--hf-dataset {args.hf_dataset}": args.hf_dataset}, args.hf_dataset)


def run_build(args: argparse.Namespace) -> int:
    import itertools

    from lens_jax.data.records import list_shards

    if args.runner == "local" and args.pipeline_args:
        raise ValueError(f"--runner local takes no Beam pipeline options: "
                         f"{' '.join(args.pipeline_args)}")
    parts, read_part, inputs, name = build_inputs(args)
    check_records_output(args, inputs, "lens-data build")
    source = args.source or os.path.basename(os.path.normpath(name)) or "data"
    if args.runner == "local":
        from lens_jax.data.build import write_items

        items = itertools.chain.from_iterable(read_part(part) for part in parts)
        total = sum(map(len, parts)) if args.images is not None else None
        report = write_items(items, args.out, what=name, total=total,
                             num_shards=args.num_shards, workers=args.workers, source=source,
                             overwrite=args.overwrite, show_progress=not args.no_progress,
                             dedup=args.dedup)
    else:
        from lens_jax.data import beam_build

        report, _ = beam_build.run(parts, read_part, args.out, what=name,
                                   num_shards=args.num_shards, source=source, dedup=args.dedup,
                                   overwrite=args.overwrite, workers=args.workers,
                                   pipeline_args=["--runner", args.runner, *args.pipeline_args])
    print(f"wrote {args.out} ({len(list_shards(args.out))} shard(s), source {source!r})")
    print(report.format())
    return 0


# ---------------------------------------------------------------------------------------------
# inspect

# Aspect-ratio bins: the nine bucket ratios (width / height) of spec section 2.8.
_ASPECT_BINS = (("1:2", 1 / 2), ("9:16", 9 / 16), ("2:3", 2 / 3), ("3:4", 3 / 4), ("1:1", 1.0),
                ("4:3", 4 / 3), ("3:2", 3 / 2), ("16:9", 16 / 9), ("2:1", 2.0))


def aspect_bin(width: int, height: int) -> str:
    """The nearest bucket ratio name (in log space), or ``<1:2`` / ``>2:1`` outside the range."""
    import math

    if height <= 0 or width <= 0:
        return "unknown"
    ratio = width / height
    if ratio < 0.5 * 0.95:
        return "<1:2"
    if ratio > 2.0 / 0.95:
        return ">2:1"
    return min(_ASPECT_BINS, key=lambda b: abs(math.log(ratio / b[1])))[0]


def _histogram(counter: collections.Counter, order: Sequence[str] | None = None, top: int = 12,
               width: int = 40) -> list[str]:
    if not counter:
        return ["  (none)"]
    keys = [k for k in order if k in counter] if order else [k for k, _ in counter.most_common(top)]
    rest = sum(counter.values()) - sum(counter[k] for k in keys)
    peak = max(counter[k] for k in keys)
    label_width = max(len(str(k)) for k in keys)
    lines = [f"  {str(k):>{label_width}}  {counter[k]:>7}  "
             f"{'#' * max(1, round(width * counter[k] / peak))}" for k in keys]
    if rest:
        lines.append(f"  {'other':>{label_width}}  {rest:>7}")
    return lines


def _length_stats(lengths: list[int]) -> str:
    if not lengths:
        return "(none)"
    return (f"min {min(lengths)}, mean {statistics.fmean(lengths):.1f}, "
            f"median {statistics.median(lengths):g}, max {max(lengths)}")


def inspect_records(path: str, num_examples: int = 3, limit: int | None = None) -> str:
    """The ``lens-data inspect`` report of a record path, as text."""
    from lens_jax.data.records import decode_example, image_format, list_shards, open_source

    shards = list_shards(path)
    source = open_source(shards)
    total = len(source)
    n = total if limit is None else min(limit, total)
    dense_words: list[int] = []
    short_words: list[int] = []
    sizes: collections.Counter = collections.Counter()
    aspects: collections.Counter = collections.Counter()
    formats: collections.Counter = collections.Counter()
    sources: collections.Counter = collections.Counter()
    no_short = 0
    shown = []
    bad: list[str] = []
    for i in range(n):
        try:
            ex = decode_example(source[i])
        except RecordError as e:
            bad.append(f"record {i}: {e}")
            continue
        dense_words.append(len(ex.caption.split()))
        if ex.short_caption:
            short_words.append(len(ex.short_caption.split()))
        else:
            no_short += 1
        sizes[f"{ex.width}x{ex.height}"] += 1
        aspects[aspect_bin(ex.width, ex.height)] += 1
        formats[image_format(ex.image_bytes)] += 1
        sources[ex.source or "(none)"] += 1
        if len(shown) < num_examples:
            shown.append(ex)
    lines = [f"records: {total} in {len(shards)} shard(s)" +
             (f" (statistics over the first {n})" if n < total else "")]
    if len(shards) <= 16:
        per_shard = [len(open_source([s])) for s in shards]
        lines += [f"  {os.path.basename(s)}: {c}" for s, c in zip(shards, per_shard)]
    if bad:
        lines.append(f"malformed records: {len(bad)}")
        lines += [f"  {b}" for b in bad[:5]]
    lines.append("sources:")
    lines += _histogram(sources)
    lines.append("image formats:")
    lines += _histogram(formats)
    lines.append(f"dense caption words: {_length_stats(dense_words)}")
    lines.append(f"short caption words: {_length_stats(short_words)}"
                 + (f" ({no_short} without a short caption)" if no_short else ""))
    lines.append("resolutions (width x height, most common):")
    lines += _histogram(sizes)
    lines.append("aspect ratios (width:height, nearest bucket ratio):")
    lines += _histogram(aspects, order=["<1:2"] + [b[0] for b in _ASPECT_BINS] + [">2:1"])
    for k, ex in enumerate(shown):
        lines.append(f"example {k}: id {ex.id!r}, source {ex.source!r}, {ex.width}x{ex.height} "
                     f"{image_format(ex.image_bytes)}, {len(ex.image_bytes)} bytes")
        lines.append(f"  short: {ex.short_caption!r}")
        lines += textwrap.wrap(ex.caption, width=96, initial_indent="  caption: ",
                               subsequent_indent="           ")
        metadata = ex.metadata if len(ex.metadata) <= 200 else ex.metadata[:200] + "..."
        lines.append(f"  metadata: {metadata}")
    return "\n".join(lines)


def add_inspect(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="statistics and a few examples of lens records",
        description="Print record counts (per shard and per source), image formats, caption "
                    "lengths in words (min/mean/median/max), resolution and aspect-ratio "
                    "histograms, and a few decoded examples.")
    p.add_argument("path", help="folder of shards, a glob, a shard file, a comma-separated list, "
                                "or tfds:NAME[:SPLIT][@DATA_DIR]")
    p.add_argument("--examples", type=int, default=3, help="how many examples to show (default 3)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="compute statistics over the first N records only (default: all)")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    print(inspect_records(args.path, num_examples=args.examples, limit=args.limit))
    return 0


# ---------------------------------------------------------------------------------------------
# synth-shapes


def add_synth_shapes(subparsers) -> None:
    p = subparsers.add_parser(
        "synth-shapes", help="write a synthetic coloured-shapes dataset with ground-truth layouts",
        description="Write N synthetic images of 1-4 coloured geometric shapes on plain or "
                    "gradient backgrounds, at the 27 training-bucket sizes (spec 2.8) scaled by "
                    "--base-size/512, as lens records: PNG image, dense caption (60-120 words), "
                    "short caption, and the ground-truth layout in the metadata JSON. The same "
                    "--seed gives identical records.")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--num", type=_positive_int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--base-size", type=_positive_int, default=512,
                   help="scale the buckets by BASE_SIZE/512, sides rounded to multiples of 16 "
                        "(default 512: the real bucket sizes; e.g. 64 or 128 for tiny images)")
    p.add_argument("--groups", default="512,768,1024",
                   help="comma-separated bucket groups (base areas) to draw sizes from "
                        "(default 512,768,1024: all 27 buckets)")
    p.add_argument("--num-shards", type=_positive_int, default=1,
                   help="number of shards (default 1)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="generator processes (default 1; the output does not depend on it)")
    p.add_argument("--short-style", choices=SHORT_CAPTION_STYLES, default="plain",
                   help="short caption: 'plain' names the objects (\"a red circle and two blue "
                        "squares\", default), 'places' also each one's ninth of the image (\"a red "
                        "circle upper left and a blue square centre\"); images are the same")
    p.add_argument("--placement", choices=PLACEMENTS, default="free",
                   help="where objects go: 'free' anywhere, in three sizes (default); 'grid' each "
                        "at the centre of its own ninth, one size, so that a 'places' caption "
                        "fixes the image but its background")
    p.add_argument("--aspect", choices=ASPECTS, default="all",
                   help="image sizes: 'all' nine aspect ratios of each group (default), 'square' "
                        "only the square bucket of each group")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth_shapes)


def run_synth_shapes(args: argparse.Namespace) -> int:
    from lens_jax.data.synth_shapes import write_dataset

    try:
        groups = tuple(int(g) for g in args.groups.split(",") if g.strip())
    except ValueError:
        raise RecordError(f"--groups: expected comma-separated integers, got {args.groups!r}")
    check_records_output(args, {}, "lens-data synth-shapes")
    shards = write_dataset(args.out, args.num, seed=args.seed, base_size=args.base_size,
                           groups=groups, num_shards=args.num_shards, workers=args.workers,
                           overwrite=args.overwrite, show_progress=not args.no_progress,
                           short_style=args.short_style, placement=args.placement,
                           aspect=args.aspect)
    print(f"wrote {args.num} synthetic examples to {args.out} ({len(shards)} shard(s))")
    return 0


# ---------------------------------------------------------------------------------------------
# tfds-prepare


def add_tfds_prepare(subparsers) -> None:
    p = subparsers.add_parser(
        "tfds-prepare", help="prepare the lens_records TFDS dataset (no TensorFlow needed)",
        description="Prepare a TFDS dataset (builder lens_records, ArrayRecord files) in "
                    "--data-dir from lens records (--records) or from an image folder with "
                    "captions (--images [--captions]). Read it back with "
                    "tfds.data_source('lens_records/CONFIG', data_dir=DATA_DIR) or "
                    "lens_jax.data.tfds_builder.tfds_source, or train on "
                    "tfds:lens_records/CONFIG:train@DATA_DIR.")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir to prepare into")
    p.add_argument("--config", required=True,
                   help="builder config name (the dataset is lens_records/CONFIG)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--records", help="existing lens records (folder, glob, file or list)")
    src.add_argument("--images", help="image folder, as for `lens-data build`")
    p.add_argument("--captions", default=None, help="captions file for --images")
    p.add_argument("--source", default="", help="source tag for --images (default: folder name)")
    p.add_argument("--validation-fraction", type=float, default=0.0,
                   help="fraction of examples (chosen by a hash of the id) put in a "
                        "'validation' split (default 0: only 'train')")
    p.set_defaults(func=run_tfds_prepare)


def run_tfds_prepare(args: argparse.Namespace) -> int:
    from lens_jax.data.tfds_builder import prepare

    builder = prepare(args.data_dir, args.config, records=args.records, images=args.images,
                      captions=args.captions, source=args.source,
                      validation_fraction=args.validation_fraction)
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} examples")
    print(f"prepared {builder.data_dir}")
    return 0


# ---------------------------------------------------------------------------------------------
# caption


def add_caption(subparsers) -> None:
    p = subparsers.add_parser(
        "caption", help="re-caption records densely with an OpenAI-compatible VLM endpoint",
        description=textwrap.dedent("""\
            Send every image of --records to an OpenAI-compatible chat-completions endpoint with
            image input (a local vLLM or SGLang server of an open vision-language model, or a
            hosted API) with a Lens-style dense prompt (about 100 words: colour, shape, size,
            texture, quantity, text and spatial relationships of the objects and background)
            and a short one, and write the records to --out with the dense caption in
            'caption' and the short one in 'short_caption' (the old ones are kept in the
            metadata as original_caption / original_short_caption). 429, 5xx, timeouts and
            malformed replies are retried with exponential backoff (Retry-After honoured);
            images that still fail are left out and counted (rerun to retry them). Every
            caption received goes at once to the --cache JSONL, so a rerun after a crash or
            Ctrl-C never captions an image twice. The output folder appears only when the run
            completes."""),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", required=True,
                   help="input lens records (folder, glob, file or comma-separated list)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--endpoint", required=True,
                   help="base URL of the API, e.g. http://127.0.0.1:8000/v1 "
                        "(/chat/completions is appended)")
    p.add_argument("--model", required=True, help="model name sent in each request")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding the API key (sent as a Bearer token; "
                        "default: no key)")
    p.add_argument("--concurrency", type=_positive_int, default=8,
                   help="requests in flight at once (default 8)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries of one request after 429/5xx/timeout/malformed reply (default 5)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for one reply (default 120)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="seconds before the first retry, doubled each retry, at most 60 "
                        "(default 1; a Retry-After header overrides it)")
    p.add_argument("--cache", default=None,
                   help="local JSONL cache of received captions, reused by reruns (default: "
                        "OUT.captions.jsonl beside --out; for a gs:// --out under "
                        "$LENS_CACHE_DIR/captions/)")
    p.add_argument("--num-shards", type=_positive_int, default=None,
                   help="output shards (default: as many as the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_caption)


def default_caption_cache(out: str) -> str:
    """``OUT.captions.jsonl`` beside a local ``--out``; for ``gs://`` (no appends there) the same
    name under the local cache, ``$LENS_CACHE_DIR/captions/BUCKET/PATH.captions.jsonl``."""
    from lens_jax import storage

    out = out.rstrip("/")
    if storage.is_remote(out):
        return os.fspath(storage.cache_dir() / "captions" / out[len("gs://"):]) + ".captions.jsonl"
    return os.path.normpath(out) + ".captions.jsonl"


def run_caption(args: argparse.Namespace) -> int:
    from lens_jax import output_guard
    from lens_jax.data.caption import CaptionConfig, caption_records

    cache = args.cache or default_caption_cache(args.out)
    check_records_output(args, {"--records": args.records, "--cache": cache}, "lens-data caption")
    output_guard.check_output(cache, {"--out": args.out, "--records": args.records}, "--cache")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env}: the variable is not set")
    cfg = CaptionConfig(endpoint=args.endpoint, model=args.model, api_key=api_key,
                        concurrency=args.concurrency, max_retries=args.max_retries,
                        timeout=args.timeout, backoff=args.backoff)
    with output_guard.interrupts_raise():
        report = caption_records(args.records, args.out, cfg, cache,
                                 num_shards=args.num_shards, overwrite=args.overwrite,
                                 show_progress=not args.no_progress)
    print(f"wrote {args.out} (captions cached in {cache})")
    print(report.format())
    return 0


# ---------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable] = [add_build, add_inspect, add_synth_shapes, add_tfds_prepare,
                               add_caption]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-data", description="Dataset tools for lens records (ArrayRecord shards of "
                                      "serialized examples; see docs/data.md).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``lens-data``."""
    parser = build_parser()
    args, pipeline_args = parser.parse_known_args(argv)
    if pipeline_args and not getattr(args, "accepts_pipeline_args", False):
        parser.error(f"unrecognized arguments: {' '.join(pipeline_args)}")
    args.pipeline_args = pipeline_args
    try:
        return int(args.func(args) or 0)
    except (RecordError, FileExistsError, ValueError, CaptionError) as e:
        print(f"lens-data {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
