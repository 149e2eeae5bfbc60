"""``lens-data build`` as an Apache Beam pipeline: the records, the skip report and the shard
layout of the local build (``build.write_items``) on any runner.

Every input is a list of *parts* (a tar shard, a parquet file, a slice of an image folder) that
``read_part`` turns into items, in order. An item's place in the input is ``(part, position)``;
the pipeline keeps it through every step so that the result does not depend on the runner:

  parts -> read items -> ``build.load_any`` (the same record making as the local build; skips
  counted by reason with Beam metrics counters) -> [--dedup: by sha256 of the image bytes, the
  first in input order kept] -> rank of each kept record in input order (per part, then the
  counts of the parts before it) -> example ``i`` to shard ``i % num_shards`` (only as many shards
  as records when there are fewer) -> each shard written in order into a temporary folder.

The driver then writes the manifest (the same ``lens_records.json`` as the local build) and
renames the folder to ``out_dir``: nothing half-written is left under the output name. For a
``gs://`` output (Dataflow) the temporary folder is ``gs://.../.NAME.tmp-ID`` beside it, copied
to ``out_dir`` shards first and manifest last (GCS has no rename), then deleted.

Memory per worker: the records of one part (ranking) and of one shard (writing) are held at
once, so parts and shards of a few GB at most (``--num-shards`` so that a shard is about 1 GB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from lens_jax import storage
from lens_jax.data.build import (DUPLICATE_IMAGE, BuildReport, Item, Skip, load_any,
                                 nothing_written)
from lens_jax.data.records import (MANIFEST_NAME, WRITER_OPTIONS, RecordError, encode_example,
                                   shard_name, write_manifest)

NAMESPACE = "lens-data build"  # Beam metrics: one counter per skip reason, and WRITTEN
WRITTEN = "written"
LISTED = 5  # skips named per reason in the report (the first ones in input order)
_REPORT_NAME = "_beam_report.json"  # the pipeline's report, read and deleted by the driver
SHARD_PREFIX = "data"

Order = tuple[int, int]  # (part index, position in the part)


def _read_part(indexed_part: tuple[int, Any], read_part: Callable[[Any], Iterable[Item | Skip]]
               ) -> Iterator[tuple[Order, Item | Skip]]:
    """``((part, position), item)``; an input error (``RecordError``: a missing column, a folder
    that is not a dataset) is tagged ``error``, so that the driver raises it as it is."""
    import apache_beam as beam

    index, part = indexed_part
    try:
        for pos, item in enumerate(read_part(part)):
            yield (index, pos), item
    except RecordError as e:
        yield beam.pvalue.TaggedOutput("error", (index, str(e)))


def _skip_output(order: Order, skip: Skip):
    import apache_beam as beam

    beam.metrics.Metrics.counter(NAMESPACE, skip.reason).inc()
    return beam.pvalue.TaggedOutput("skip", (order, skip))


def _load(element: tuple[Order, Item | Skip], source: str, dedup: bool):
    """``(order, (id, sha256 or b"", record bytes))``, or a tagged skip."""
    order, item = element
    result = item if isinstance(item, Skip) else load_any(item, source)
    if isinstance(result, Skip):
        yield _skip_output(order, result)
        return
    digest = hashlib.sha256(result.image_bytes).digest() if dedup else b""
    yield order, (result.id, digest, encode_example(result))


def _first_of_same_bytes(grouped: tuple[bytes, Iterable[tuple[Order, tuple]]]):
    """Of the records with the same image bytes, the first in input order; the others skipped as
    ``build.examples_with_report`` does."""
    _, entries = grouped
    (order, (first_id, digest, record)), *rest = sorted(entries, key=lambda e: e[0])
    yield order, (first_id, digest, record)
    for dup_order, (dup_id, _, _) in rest:
        yield _skip_output(dup_order, Skip(dup_id, DUPLICATE_IMAGE, f"same bytes as {first_id}"))


def _rank_in_part(grouped: tuple[int, Iterable[tuple[int, bytes]]]):
    """``(part, rank, record)``: the records of one part in input order."""
    part, entries = grouped
    for rank, (_, record) in enumerate(sorted(entries, key=lambda e: e[0])):
        yield part, rank, record


def _offsets(counts: list[tuple[int, int]]) -> dict[str, Any]:
    """The index of each part's first record and the number of records."""
    offsets, total = {}, 0
    for part, count in sorted(counts):
        offsets[part] = total
        total += count
    return {"offsets": offsets, "total": total}


def _to_shard(ranked: tuple[int, int, bytes], layout: dict[str, Any], num_shards: int):
    part, rank, record = ranked
    index = layout["offsets"][part] + rank
    return index % num_shards, (index, record)


def _write_shard(grouped: tuple[int, Iterable[tuple[int, bytes]]], folder: str,
                 layout: dict[str, Any], num_shards: int) -> tuple[str, int]:
    """Writes one shard (its records in input order) into ``folder``; ``(name, count)``."""
    import apache_beam as beam
    from array_record.python.array_record_module import ArrayRecordWriter

    shard, entries = grouped
    name = shard_name(SHARD_PREFIX, shard, min(num_shards, layout["total"]))
    records = [record for _, record in sorted(entries, key=lambda e: e[0])]
    with _local_file(os.path.join(folder, name)) as path:
        writer = ArrayRecordWriter(path, WRITER_OPTIONS)
        try:
            for record in records:
                writer.write(record)
        finally:
            writer.close()
    beam.metrics.Metrics.counter(NAMESPACE, WRITTEN).inc(len(records))
    return name, len(records)


@contextlib.contextmanager
def _local_file(dst: str) -> Iterator[str]:
    """A local path to write ``dst`` at (ArrayRecord writes local files only); a ``gs://``
    ``dst`` is uploaded when the block succeeds."""
    if not storage.is_remote(dst):
        yield dst
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(dst))
        yield local
        storage.move(local, dst)


def _write_report(_, folder: str, counts, first, shards, errors) -> None:
    report = {"errors": [message for _, message in sorted(errors)],
              "counts": dict(counts),
              "first": {reason: [[skip.id, skip.detail] for _, skip in skips]
                        for reason, skips in first},
              "shards": dict(shards)}
    storage.write_text(os.path.join(folder, _REPORT_NAME), json.dumps(report))


def build_pipeline(pipeline, parts: Sequence[Any], read_part: Callable[[Any], Iterable],
                   folder: str, num_shards: int = 1, source: str = "", dedup: bool = False):
    """Adds the build of ``parts`` into ``folder`` (shards and ``_beam_report.json``) to
    ``pipeline``."""
    import apache_beam as beam
    from apache_beam.transforms import combiners

    read = (pipeline
            | "parts" >> beam.Create(list(enumerate(parts)))
            | "read" >> beam.FlatMap(_read_part, read_part).with_outputs("error", main="items"))
    loaded = (read.items
              | "spread" >> beam.Reshuffle()
              | "load" >> beam.FlatMap(_load, source, dedup).with_outputs("skip", main="records"))
    records, skips = loaded.records, [loaded.skip]
    if dedup:
        deduped = (records
                   | "by image bytes" >> beam.Map(lambda kv: (kv[1][1], kv))
                   | "same bytes" >> beam.GroupByKey()
                   | "first of same bytes" >> beam.FlatMap(_first_of_same_bytes)
                   .with_outputs("skip", main="records"))
        records = deduped.records
        skips.append(deduped.skip)
    layout = (records
              | "part of each" >> beam.Map(lambda kv: (kv[0][0], 1))
              | "count per part" >> beam.CombinePerKey(sum)
              | "all counts" >> combiners.ToList()
              | "offsets" >> beam.Map(_offsets))
    shards = (records
              | "by part" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1][2])))
              | "parts whole" >> beam.GroupByKey()
              | "rank in part" >> beam.FlatMap(_rank_in_part)
              | "to shard" >> beam.Map(_to_shard, beam.pvalue.AsSingleton(layout), num_shards)
              | "shards whole" >> beam.GroupByKey()
              | "write shard" >> beam.Map(_write_shard, folder, beam.pvalue.AsSingleton(layout),
                                          num_shards))
    skipped = skips[0] if len(skips) == 1 else tuple(skips) | "all skips" >> beam.Flatten()
    by_reason = skipped | "by reason" >> beam.Map(lambda kv: (kv[1].reason, kv))
    counts = by_reason | "count per reason" >> combiners.Count.PerKey()
    first = (by_reason
             | "first per reason" >> combiners.Top.PerKey(LISTED, key=lambda kv: kv[0],
                                                          reverse=True))
    _ = (pipeline
         | "report" >> beam.Create([None])
         | "write report" >> beam.Map(_write_report, folder, beam.pvalue.AsList(counts),
                                      beam.pvalue.AsList(first), beam.pvalue.AsList(shards),
                                      beam.pvalue.AsList(read.error)))


def pipeline_options(pipeline_args: Sequence[str] = (), workers: int = 1):
    """Beam options from ``pipeline_args`` (``--runner`` and any other pipeline option); on the
    DirectRunner ``workers`` processes (``direct_num_workers``, multi-processing) unless given."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    options = PipelineOptions(list(pipeline_args))
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    options.view_as(StandardOptions).runner = runner
    direct = options.view_as(DirectOptions)
    if runner in ("DirectRunner", "direct") and not any(
            a.startswith(("--direct_num_workers", "--direct_running_mode")) for a in pipeline_args):
        direct.direct_num_workers = workers
        direct.direct_running_mode = "multi_processing" if workers > 1 else "in_memory"
    return options


def local_runner(options):
    """On the DirectRunner (the default), Beam's FnApiRunner itself, with the pipeline's options;
    otherwise ``None`` (``beam.Pipeline`` builds the runner that ``--runner`` names).

    apache-beam's DirectRunner first tries its Prism runner, which fetches a Go binary from
    github.com when the pipeline starts; offline, that fails after a network lookup, leaves an
    empty ``beam-temp*`` folder in the temporary directory and falls back to the FnApiRunner. So
    a local build never depends on the network, and runs on the runner its tests use."""
    from apache_beam.options.pipeline_options import StandardOptions

    if options.view_as(StandardOptions).runner not in ("DirectRunner", "direct"):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # the pipeline options reach the SDK workers (multi-processing) as the DirectRunner passes them
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


@contextlib.contextmanager
def output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """A fresh temporary folder beside ``out_dir`` (local or ``gs://``) that becomes ``out_dir``
    when the block succeeds; on any failure it is deleted and ``out_dir`` is left as it was."""
    from lens_jax.output_guard import atomic_output_dir

    if not storage.is_remote(out_dir):
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            yield str(tmp)
        return
    out = storage.path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite)")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        yield os.fspath(tmp)
        storage.rmtree(out)
        files = storage.files_under(tmp)
        for name, f in sorted(files, key=lambda nf: (nf[0] == MANIFEST_NAME, nf[0])):
            f.copy(out / name, overwrite=True)  # the manifest last: its presence marks completion
    finally:
        storage.rmtree(tmp)


def counters(result) -> dict[str, int]:
    """The build's Beam counters of a finished pipeline ``result`` (reason or ``written`` ->
    committed count; attempted where the runner has no committed values; ``{}`` where it cannot
    be queried: the report does not depend on them)."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except (NotImplementedError, AttributeError, RuntimeError):
        return {}
    return {c.key.metric.name: (c.committed if c.committed is not None else c.attempted)
            for c in found}


def run(parts: Sequence[Any], read_part: Callable[[Any], Iterable[Item | Skip]],
        out_dir: str | os.PathLike, what: str, num_shards: int = 1, source: str = "",
        dedup: bool = False, overwrite: bool = False, pipeline_args: Sequence[str] = (),
        workers: int = 1) -> tuple[BuildReport, dict[str, int]]:
    """Builds lens records of ``parts`` in ``out_dir`` with Beam; ``(report, counters)``.
    ``RecordError`` (nothing written) when every image is skipped."""
    import apache_beam as beam

    options = pipeline_options(pipeline_args, workers)
    with output_folder(out_dir, overwrite=overwrite) as folder:
        pipeline = beam.Pipeline(runner=local_runner(options), options=options)
        build_pipeline(pipeline, parts, read_part, folder, num_shards=num_shards, source=source,
                       dedup=dedup)
        result = pipeline.run()
        result.wait_until_finish()
        report_path = os.path.join(folder, _REPORT_NAME)
        data = json.loads(storage.read_text(report_path))
        storage.rmtree(report_path)
        if data["errors"]:
            raise RecordError("\n".join(data["errors"]))
        report = BuildReport(written=sum(data["shards"].values()))
        for reason, count in data["counts"].items():
            for skip_id, detail in data["first"].get(reason, []):
                report.add_skip(Skip(skip_id, reason, detail))
            report.unlisted[reason] = count - len(report.skipped.get(reason, ()))
        if report.written == 0:
            raise nothing_written(what, report)
        shards = dict(sorted(data["shards"].items()))
        write_manifest(folder, shards, {"source": source, "build": report.summary()})
    return report, counters(result)


def read_files(reader: Callable[..., Iterable[Item | Skip]], part: str, **kwargs
               ) -> Iterable[Item | Skip]:
    """``reader([part], **kwargs)``: one input file as a part (``functools.partial`` it)."""
    return reader([part], **kwargs)


def read_list(part: Sequence[Item | Skip]) -> Sequence[Item | Skip]:
    """A part that is already a list of items (a slice of an image folder)."""
    return part


def chunks(items: Sequence[Item | Skip], size: int = 256) -> list[list[Item | Skip]]:
    """``items`` as parts of ``size`` items (an image folder's list, split for the workers)."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]

