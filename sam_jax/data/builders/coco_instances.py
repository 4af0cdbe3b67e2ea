"""`coco_instances`: COCO-format instance segmentation (COCO 2017, LVIS, COCO exports).

One record per image that has annotations, keyed by image id, in the layout
of `features.instance_features` plus per-mask `category_id` (N,) int64,
`iscrowd` (N,) int64 and `coco_area` (N,) float32 (see `coco_reader`).
Crowd regions are kept with `iscrowd = 1`.

    import sam_jax.data.builders.coco_instances as coco_instances
    builder = coco_instances.CocoInstances(data_dir=..., on_bad_record="skip")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/coco"))
    builder.as_data_source("val2017")[0]

`info.metadata` holds, per split: `bad_records` (the BadRecordPolicy report),
`images_without_annotations` (legitimate COCO images with no annotation, not
written) and `sources` (the JSON file each split was read from).

Given `beam_options` (or a `beam_runner`) in the DownloadConfig it prepares on
Apache Beam: each JSON parsed on one worker, its images read in parts of
`IMAGES_PER_BEAM_PART` on all of them, to the same records (`beam_prepare`).
"""

import logging
from typing import Dict, Optional, Tuple

import tensorflow_datasets as tfds
from etils import epath

from sam_jax.data import beam_prepare
from sam_jax.data.bad_records import BadRecordPolicy
from sam_jax.data.coco_reader import EXTRA_MASK_FIELDS, CocoReader
from sam_jax.data.features import instance_features

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Either pass the splits explicitly (any COCO-format data set, e.g. LVIS):

    CocoInstances(splits={"train": ("/data/lvis/lvis_v1_train.json", "/data/coco"),
                          "validation": ("/data/lvis/lvis_v1_val.json", "/data/coco")})

each split a (COCO JSON, image folder) pair; image `file_name`s are relative
to the image folder. LVIS images have only a `coco_url`
(http://images.cocodataset.org/train2017/000000391895.jpg): the image is
looked up as <image folder>/000000391895.jpg, then as
<image folder>/train2017/000000391895.jpg, so pointing LVIS at the folder
holding COCO's train2017/ and val2017/ works for both its splits.

Or, without `splits=`, lay the manual dir out as the COCO 2017 downloads
unpack (https://cocodataset.org/#download: 2017 Train/Val images and
annotations):

    <manual_dir>/annotations/instances_train2017.json
    <manual_dir>/annotations/instances_val2017.json
    <manual_dir>/train2017/*.jpg
    <manual_dir>/val2017/*.jpg

Every annotations/instances_<split>.json with a <split>/ image folder becomes
split <split> (train2017, val2017).

One data set per data_dir: prepare COCO and LVIS into different data_dirs.
"""


class CocoInstances(beam_prepare.BeamPreparable, tfds.core.GeneratorBasedBuilder):
    """COCO-format instance segmentation: masks as compressed RLE, crowd regions flagged."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    IMAGES_PER_BEAM_PART = beam_prepare.IMAGES_PER_PART

    def __init__(
        self,
        *,
        splits: Optional[Dict[str, Tuple[str, str]]] = None,
        on_bad_record: str = "error",
        file_format: str = "array_record",
        **kwargs,
    ):
        BadRecordPolicy(on_bad_record)  # rejects an unknown mode before any work
        self._on_bad_record = on_bad_record
        self._splits = None if splits is None else {name: (str(j), str(d)) for name, (j, d) in splits.items()}
        self._reports: Dict[str, dict] = {}
        self._without_annotations: Dict[str, int] = {}
        self._sources: Dict[str, str] = {}
        super().__init__(file_format=file_format, **kwargs)
        self._check_prepared_sources()

    def _check_prepared_sources(self) -> None:
        """Refuses `splits=` naming other JSON files than the data already prepared in data_dir.

        download_and_prepare would otherwise keep the old data and return it
        under the new split names.
        """
        if self._splits is None or not self.is_prepared():
            return
        prepared = dict(self.info.metadata.get("sources", {}))
        wanted = {name: epath.Path(json_path).name for name, (json_path, _) in self._splits.items()}
        if prepared != wanted:
            raise ValueError(
                f"{self.data_dir} already holds coco_instances prepared from {prepared}, not {wanted}; "
                "use another data_dir for another data set"
            )

    def _info(self) -> tfds.core.DatasetInfo:
        extra = {name: tfds.features.Tensor(shape=(None,), dtype=dtype) for name, dtype in EXTRA_MASK_FIELDS.items()}
        return self.dataset_info_from_configs(
            description="COCO-format instance segmentation (COCO 2017, LVIS, COCO exports): one record per "
            "annotated image, masks as compressed RLE at the image size, crowd regions kept with iscrowd=1.",
            features=instance_features(extra),
            metadata=tfds.core.MetadataDict(),
            homepage="https://cocodataset.org/#format-data",
        )

    def _split_generators(self, dl_manager):
        splits = self._splits if self._splits is not None else self._manual_dir_splits(dl_manager.manual_dir)
        for name, (json_path, image_dir) in splits.items():
            if not epath.Path(json_path).is_file():
                raise FileNotFoundError(f"split {name!r}: annotation file {json_path} does not exist")
            if not epath.Path(image_dir).is_dir():
                raise FileNotFoundError(f"split {name!r}: image folder {image_dir} does not exist")
        if self._on_beam:
            read, mode, part = beam_prepare.read_coco, self._on_bad_record, self.IMAGES_PER_BEAM_PART
            return {name: self._beam_split(name, read, j, d, mode, part) for name, (j, d) in splits.items()}
        return {name: self._generate_examples(name, j, d) for name, (j, d) in splits.items()}

    @staticmethod
    def _manual_dir_splits(manual_dir: epath.Path) -> Dict[str, Tuple[str, str]]:
        """The COCO 2017 layout: annotations/instances_<split>.json + <split>/."""
        splits = {}
        for json_path in sorted((manual_dir / "annotations").glob("instances_*.json")):
            name = json_path.stem[len("instances_") :]
            if (manual_dir / name).is_dir():
                splits[name] = (str(json_path), str(manual_dir / name))
            else:
                folder = manual_dir / name
                logging.warning("coco_instances: no image folder %s for %s; split left out", folder, json_path)
        if not splits:
            raise FileNotFoundError(
                f"no annotations/instances_<split>.json with a <split>/ image folder in {manual_dir}.\n"
                + _MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return splits

    def _generate_examples(self, split: str, json_path: str, image_dir: str):
        policy = BadRecordPolicy(self._on_bad_record)
        reader = CocoReader(json_path, image_dir, policy)
        yield from reader
        self._store_split_metadata(split, policy.report(), reader.images_without_annotations, reader.name)

    def _store_split_metadata(self, split: str, report: dict, images_without_annotations: int, sources: str):
        self._reports[split] = report
        self._without_annotations[split] = images_without_annotations
        self._sources[split] = sources
        # Metadata set during generation is written with the data set.
        self.info.metadata["bad_records"] = dict(self._reports)
        self.info.metadata["images_without_annotations"] = dict(self._without_annotations)
        self.info.metadata["sources"] = dict(self._sources)
