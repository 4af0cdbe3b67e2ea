"""Preparing `sa1b` and `coco_instances` on Apache Beam: work split, bad records merged.

A builder that mixes in `BeamPreparable` runs its splits as Beam pipelines
when the DownloadConfig names a `beam_runner` or `beam_options` (tfds's Beam
support), else as before in one process:

    options = pipeline_options("DirectRunner", workers=2)   # or Dataflow, Flink, Spark options
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir="/data/sa1b", beam_options=options))

The work unit of `sa1b` is one source of `sa1b_reader.find_sources` (a tar,
streamed, or a folder); `coco_instances` parses each JSON once on one worker
and reads its images in parts of `IMAGES_PER_PART`. Keys and examples are
those of the single-process path. Each unit reports its bad records to a
policy of its own; the reports are merged in reading order (the counts summed,
the first examples of each reason kept) and stored in `info.metadata` as the
single-process path stores them. In "error" mode the first bad record a worker
meets fails the pipeline, and `download_and_prepare` raises it as the
BadRecordError it was.

SA-1B images found in two sources are resolved after reading: the copy in the
earlier source is kept and each later one counted as `duplicate_image`, as in
one process. One difference remains: a later copy that is itself bad counts
under its own reason (one process never reads it). The manual dir and the data
dir must be reachable at the same paths from every worker. apache_beam is
imported only when a pipeline is built.

The DirectRunner holds every PCollection in memory (the whole data set, more
than once): it is for a few GB; prepare SA-1B at scale on Dataflow, Flink or
Spark. Its multi_threading mode is refused: with tfds's writer it lost
records in our runs.
"""

import collections
import functools
import json
import os
from typing import Dict, Optional, Sequence

from etils import epath

from sam_jax.data import sa1b_reader
from sam_jax.data.bad_records import EXAMPLES_KEPT, BadRecordError, BadRecordPolicy
from sam_jax.data.coco_reader import CocoReader

IMAGES_PER_PART = 500  # coco_instances: images per work unit
_MARKER = "sam_jax bad record: "  # a worker's BadRecordError, as JSON after this, in the runner's error text


def pipeline_options(runner: str = "DirectRunner", workers: Optional[int] = None, options: Sequence[str] = ()):
    """Beam PipelineOptions for `runner`; `options` are "KEY=VALUE" (or "KEY") pipeline options.

    On the DirectRunner, `workers` processes (default: one per CPU) run the
    work units (direct_num_workers, direct_running_mode=multi_processing);
    "direct_running_mode=in_memory" in `options` runs one thread without
    the processes' transfers (faster on two cores). Raises ValueError for a
    malformed or unknown option.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = [f"--runner={runner}"]
    if runner == "DirectRunner":
        flags += [f"--direct_num_workers={workers or os.cpu_count()}", "--direct_running_mode=multi_processing"]
    elif workers is not None:
        raise ValueError(f"workers is for the DirectRunner; give {runner} its own worker options")
    for option in options:
        if not option or option.startswith("-") or option.startswith("="):
            raise ValueError(f"Beam option {option!r}: expected KEY=VALUE or KEY, without leading dashes")
        flags.append("--" + option)
    parsed = PipelineOptions(flags)
    unknown = set(parsed.get_all_options(retain_unknown_options=True)) - set(parsed.get_all_options())
    if unknown:
        raise ValueError(f"unknown Beam pipeline option(s) {sorted(unknown)}")
    return parsed


class BeamPreparable:
    """Mixin (before tfds.core.GeneratorBasedBuilder): splits on Beam when the DownloadConfig asks.

    The builder returns `self._beam_split(split, read, *args)` from
    `_split_generators` when `self._on_beam`, and implements
    `_store_split_metadata(split, report, **extras)`, which its single-process
    path calls too.
    """

    _on_beam = False

    def _download_and_prepare(self, dl_manager, download_config):
        self._on_beam = download_config.beam_runner is not None or download_config.beam_options is not None
        self._metadata_paths: Dict[str, epath.Path] = {}
        if not self._on_beam:
            return super()._download_and_prepare(dl_manager, download_config)
        _refuse_multi_threading(download_config.beam_options)
        try:
            super()._download_and_prepare(dl_manager, download_config)
        except Exception as e:  # the runner's failure: a BadRecordError a worker raised, or another
            bad = _bad_record_in(str(e))
            if bad is None:
                raise
            raise bad from None
        for split, path in self._metadata_paths.items():
            metadata = json.loads(path.read_text())
            path.unlink()
            self._store_split_metadata(split, metadata.pop("bad_records"), **metadata)

    def _beam_split(self, split: str, read, *args):
        """A PTransform: `read(pbegin, *args)` -> (examples, reports), the merged reports written beside the data."""
        import apache_beam as beam

        path = self.data_path / f"{split}.beam_metadata.json"
        self._metadata_paths[split] = path

        @beam.ptransform_fn
        def expand(pbegin):
            examples, reports = read(pbegin, *args)
            _ = (
                reports
                | "MergeReports" >> beam.CombineGlobally(_merge_reports)
                | "WriteMetadata" >> beam.Map(_write_metadata, os.fspath(path))
            )
            return examples

        return expand()  # pylint: disable=no-value-for-parameter


def _refuse_multi_threading(options) -> None:
    """The DirectRunner's multi_threading mode lost records in tfds's writer (Beam 2.78, tfds 4.9.10:
    some runs wrote 188 or 190 of 192 examples without an error, others failed); refused."""
    if options is None:
        return
    from apache_beam.options.pipeline_options import DirectOptions

    if options.view_as(DirectOptions).direct_running_mode == "multi_threading":
        raise ValueError("direct_running_mode=multi_threading loses records when tfds writes on the DirectRunner; "
                         "use multi_processing (the default here) or in_memory")


def _raising_visibly(read_unit):
    """Wraps a worker's generator so that a BadRecordError reaches the driver whole.

    Runners hand the driver the worker's traceback as text; the error's
    reason, place and message travel in it as JSON after _MARKER.
    """

    @functools.wraps(read_unit)
    def wrapped(*args):
        try:
            yield from read_unit(*args)
        except BadRecordError as e:
            fields = {"reason": e.reason, "where": e.where, "message": str(e)[len(e.where) + 2 :]}
            raise RuntimeError(_MARKER + json.dumps(fields)) from e

    return wrapped


def _bad_record_in(text: str) -> Optional[BadRecordError]:
    at = text.rfind(_MARKER)
    if at < 0:
        return None
    fields, _ = json.JSONDecoder().raw_decode(text, at + len(_MARKER))
    return BadRecordError(fields["reason"], fields["where"], fields["message"])


# ---- reports --------------------------------------------------------------------------------------
# A partial report: {"skipped": {reason: n}, "examples": {reason: [(order, i, message)]}, "extras": {}};
# `order` is a tuple placing the unit that wrote it in the single-process reading order.


def _partial(order: tuple, report: dict, extras: Optional[dict] = None) -> dict:
    examples = {r: [(order, i, m) for i, m in enumerate(ms)] for r, ms in report["examples"].items()}
    return {"skipped": dict(report["skipped"]), "examples": examples, "extras": dict(extras or {})}


def _merge_reports(partials) -> dict:
    """Partial reports -> one: counts summed, the EXAMPLES_KEPT first examples per reason in reading order."""
    skipped, examples, extras = collections.Counter(), collections.defaultdict(list), {}
    for partial in partials:
        skipped.update(partial["skipped"])
        extras.update(partial["extras"])
        for reason, items in partial["examples"].items():
            examples[reason].extend(items)
    kept = {reason: sorted(items)[:EXAMPLES_KEPT] for reason, items in examples.items()}
    return {"skipped": dict(skipped), "examples": kept, "extras": extras}


def _write_metadata(partial: dict, path: str) -> None:
    examples = {reason: [message for _, _, message in items] for reason, items in partial["examples"].items()}
    report = {"skipped": partial["skipped"], "examples": examples}
    epath.Path(path).write_text(json.dumps({"bad_records": report, **partial["extras"]}))


# ---- sa1b: one source per work unit ---------------------------------------------------------------


def read_sa1b(pbegin, manual_dir: str, mode: str):
    """(examples, reports) of every SA-1B source under `manual_dir`, a source per work unit."""
    import apache_beam as beam

    sources = sa1b_reader.find_sources(manual_dir)
    if not sources:
        raise FileNotFoundError(f"no sa_*.tar files and no sa_*.jpg / sa_*.json files under {manual_dir}")
    units = [(index, kind, rel) for index, (kind, rel) in enumerate(sources)]
    read = (
        pbegin
        | "Sources" >> beam.Create(units)
        | "Distribute" >> beam.Reshuffle()
        | "Read" >> beam.FlatMap(_read_sa1b_source, manual_dir, mode).with_outputs("reports", "seen", main="examples")
    )
    duplicates = (
        read.seen
        | "GroupByImage" >> beam.GroupByKey()
        | "Duplicates" >> beam.FlatMap(_sa1b_duplicates, mode).with_outputs("reports", main="dropped")
    )
    examples = read.examples | "DropDuplicates" >> beam.FlatMap(
        _first_copy, dropped=beam.pvalue.AsDict(duplicates.dropped)
    )
    return examples, (read.reports, duplicates.reports) | "AllReports" >> beam.Flatten()


@_raising_visibly
def _read_sa1b_source(unit, manual_dir: str, mode: str):
    """Examples (key, (source index, example)) of one source; its report; each image read -> where."""
    from apache_beam import pvalue

    index, kind, rel = unit
    policy, seen = BadRecordPolicy(mode), {}
    path = os.path.join(manual_dir, rel)
    if kind == "tar":
        with open(path, "rb") as f:
            for key, example in sa1b_reader.iter_tar(f, rel, policy, seen):
                yield key, (index, example)
    else:
        for key, example in sa1b_reader.iter_folder(path, rel, policy, seen):
            yield key, (index, example)
    yield pvalue.TaggedOutput("reports", _partial((index, 0), policy.report()))
    for position, (file_name, where) in enumerate(seen.items()):
        yield pvalue.TaggedOutput("seen", (file_name, (index, position, where)))


@_raising_visibly
def _sa1b_duplicates(item, mode: str):
    """An image read from several sources: later copies are duplicates of the first (reported, dropped)."""
    from apache_beam import pvalue

    file_name, copies = item
    copies = sorted(copies)
    _, _, first_where = copies[0]
    for index, position, where in copies[1:]:
        policy = BadRecordPolicy(mode)
        policy.handle(BadRecordError("duplicate_image", where, f"{file_name} was already read from {first_where}"))
        yield pvalue.TaggedOutput("reports", _partial((index, 1, position), policy.report()))
        yield (file_name, index), True


def _first_copy(item, dropped: dict):
    key, (index, example) = item
    if (key, index) not in dropped:
        yield key, example


# ---- coco_instances: the JSON on one worker, its images in parts ----------------------------------


def read_coco(pbegin, json_path: str, image_dir: str, mode: str, images_per_part: int):
    """(examples, reports) of one COCO-format split, its images read in parts of `images_per_part`."""
    import apache_beam as beam

    indexed = (
        pbegin
        | "Json" >> beam.Create([(json_path, image_dir)])
        | "Index" >> beam.FlatMap(_index_coco, mode, images_per_part).with_outputs("reports", main="parts")
    )
    read = (
        indexed.parts
        | "Distribute" >> beam.Reshuffle()
        | "Read" >> beam.FlatMap(_read_coco_part).with_outputs("reports", main="examples")
    )
    return read.examples, (indexed.reports, read.reports) | "AllReports" >> beam.Flatten()


@_raising_visibly
def _index_coco(paths, mode: str, images_per_part: int):
    """Parses the JSON (reporting its bad entries); (part index, CocoReader part) per part."""
    from apache_beam import pvalue

    reader = CocoReader(*paths, BadRecordPolicy(mode))
    extras = {"images_without_annotations": reader.images_without_annotations, "sources": reader.name}
    yield pvalue.TaggedOutput("reports", _partial((0,), reader.policy.report(), extras))
    yield from enumerate(reader.parts(images_per_part))


@_raising_visibly
def _read_coco_part(item):
    from apache_beam import pvalue

    index, part = item
    yield from part
    yield pvalue.TaggedOutput("reports", _partial((1, index), part.policy.report()))

