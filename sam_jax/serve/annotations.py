"""`AnnotationStore`: the data engine's assisted-manual and semi-automatic stages (the SAM
paper's section 4) over the --images folder, saved as SA-1B files; no HTTP in it.

    store = AnnotationStore(service, Path("photos/annotations"))
    store.accept("cat.jpg", prediction_id=pid, index=1)   # a mask made with clicks or a box
    store.accept("cat.jpg", proposal=key)                  # a generator proposal as it is
    store.accept("cat.jpg", pid, 0, proposal=key)          # a proposal fixed with clicks
    store.delete("cat.jpg", 2); store.set_done("cat.jpg", True)

The annotations folder (`sam_jax.data.sa1b_writer`; `prepare_data sa1b --manual-dir` reads it):

    sa_<stem>.json + sa_<stem>.jpg|.png  one image's accepted masks, rewritten atomically on every
                                         accept and delete; removed with its last mask, so that no
                                         JSON is left without masks (the reader's "no_masks")
    .progress.json                       {"images": {stem: {"done", "rejected", "next_id"}}}: what
                                         the JSONs cannot hold (an image done with no masks, the
                                         rejected proposals, the highest id given); hidden, so the
                                         reader passes it by

Each annotation has SA-1B's keys (its crop_box the whole image, its stability score
`SegmentationService.chosen_mask`'s) and `point_labels` (one per click; [] when point_coords
is a box's centre), `box` [x0, y0, x1, y1] or null, `source` "manual" | "proposal" |
"proposal_fixed" and `proposal` (the proposal's key, or null). Ids count from 1 per image and
are never given twice. Proposals are the automatic mask generator's records with
`proposal_settings`; each is known by `key`, a hash of its RLE, so that marks made on it
outlive the server. A server started again reads all of this back.

One lock serialises the changes (several tabs may send them); what is held in memory changes
only once the files are written. Errors are `RequestError`s naming the problem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Optional

from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.data import sa1b_writer
from sam_jax.serve.service import EVERYTHING_DEFAULTS, RequestError, SegmentationService

PROGRESS = ".progress.json"


def proposal_key(record: dict) -> str:
    """A proposal's name: 12 hex digits of its RLE's SHA-256."""
    segmentation = record["segmentation"]
    return hashlib.sha256(f"{segmentation['size']}{segmentation['counts']}".encode()).hexdigest()[:12]


@contextlib.contextmanager
def saving(path: Path):
    """An OSError while writing `path` as a RequestError (500) saying so."""
    try:
        yield
    except OSError as err:
        raise RequestError(500, f"{path} cannot be saved ({err.strerror or err}); the files are as they were "
                                "(the writes are atomic)") from None


class AnnotationStore:
    def __init__(self, service: SegmentationService, folder: Path,
                 proposal_settings: Optional[dict[str, Any]] = None) -> None:
        """Annotates `service.images_folder`'s images (those there now) into `folder`."""
        if service.images_folder is None:
            raise ValueError("annotating needs --images: the folder of images to annotate")
        self.service = service
        self.folder = Path(folder).resolve()
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--annotations {folder} exists and is not a folder")
        if self.folder == service.images_folder:
            raise ValueError(f"--annotations {folder} is the --images folder; give another one "
                             "(the default is IMAGES/annotations)")
        unknown = sorted(set(proposal_settings or {}) - set(EVERYTHING_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown proposal settings {unknown}; known: {sorted(EVERYTHING_DEFAULTS)}")
        self.proposal_settings = {**EVERYTHING_DEFAULTS, **(proposal_settings or {})}
        SamAutomaticMaskGenerator(service.model, service.params, **self.proposal_settings)  # checks the values
        self.images = service.list_images()
        if not self.images:
            raise ValueError(f"--images {service.images_folder}: no images to annotate")
        self._stems: dict[str, str] = {}
        by_stem: dict[str, str] = {}
        for name in self.images:
            stem = Path(name).stem
            if stem in by_stem:
                raise ValueError(f"{by_stem[stem]} and {name} would both be saved as "
                                 f"{sa1b_writer.json_name(stem)}; rename one of them")
            by_stem[stem] = name
            self._stems[name] = stem
        self._lock = threading.Lock()
        self._annotations: dict[str, list[dict]] = {name: [] for name in self.images}
        self._image_ids: dict[str, int] = {}  # of the images with a saved JSON
        for stem in sa1b_writer.stems_in(self.folder):
            if stem in by_stem:  # a JSON of an image no longer in the folder is left as it is
                record = self._read_json(self.folder / sa1b_writer.json_name(stem), "image", "annotations")
                self._annotations[by_stem[stem]] = record["annotations"]
                self._image_ids[by_stem[stem]] = record["image"]["image_id"]
        self._progress: dict[str, dict] = {}  # stem -> {"done", "rejected", "next_id"}
        if (self.folder / PROGRESS).exists():
            self._progress = self._read_json(self.folder / PROGRESS, "images")["images"]

    # ----------------------------------------------------------------------------- reading

    def summary(self) -> dict:
        """{"folder", "images": [{"name", "done", "masks"}], "first_open" (the first image not
        done, or None), "progress", "proposal_settings"}."""
        with self._lock:
            images = [{"name": name, "done": self._done(name), "masks": len(self._annotations[name])}
                      for name in self.images]
            progress = self._counts()
        first_open = next((i for i, image in enumerate(images) if not image["done"]), None)
        return {"folder": str(self.folder), "images": images, "first_open": first_open, "progress": progress,
                "proposal_settings": self.proposal_settings}

    def image_state(self, name: str) -> dict:
        """{"image", "index", "done", "annotations", "proposal_marks" {key: "accepted" | "fixed" |
        "rejected"}, "progress"}; a 409 when the saved masks were made on other content."""
        self._check_name(name)
        image_id = sa1b_writer.stable_image_id(self.service.folder_image(name))
        with self._lock:
            self._check_content(name, image_id)
            return self._state(name)

    def proposals(self, name: str) -> dict:
        """{"proposals": the generator's records with their "key", "seconds", "settings",
        "proposal_marks"}; computed once per image (the service caches them)."""
        result = self._proposal_result(name)
        with self._lock:
            marks = self._marks(name)
        return {"proposals": list(result["proposals"].values()), "seconds": result["seconds"],
                "settings": result["settings"], "proposal_marks": marks}

    # ----------------------------------------------------------------------------- changes

    def accept(self, name: str, prediction_id: Optional[str] = None, index: Optional[int] = None,
               proposal: Optional[str] = None) -> dict:
        """Saves a mask: a prediction's mask `index`, a proposal as it is, or (all three) a
        prediction whose first click was the proposal's point. Returns {"annotation", **image_state}."""
        self._check_name(name)
        data = self.service.folder_image(name)
        digest = hashlib.sha256(data).hexdigest()  # the service's image_id
        if prediction_id is None and index is None and proposal is not None:
            record = {**self._proposal(name, proposal), "point_labels": [1], "box": None}
            source = "proposal"
        elif prediction_id is not None and index is not None:
            record = self._prediction_record(digest, prediction_id, index)
            source = "manual"
            if proposal is not None:
                self._check_fixed(record, self._proposal(name, proposal), prediction_id, proposal)
                source = "proposal_fixed"
        else:
            raise RequestError(422, "give prediction_id and index (a mask made with prompts), proposal (a "
                                    "proposal as it is), or all three (a proposal fixed with prompts)")
        record.update(source=source, proposal=proposal)
        pixels = self.service.embed_upload(data, name)[0].image
        with self._lock:
            annotations = self._annotations[name]
            for saved in annotations:
                if saved["segmentation"] == record["segmentation"]:
                    raise RequestError(409, f"{name}: this mask is already saved, as annotation {saved['id']}")
            new = sa1b_writer.annotation(record, self._next_id(name))
            self._write(name, data, pixels, annotations + [new])
            return {"annotation": new, **self._state(name)}

    def delete(self, name: str, annotation_id: int) -> dict:
        """Deletes one saved mask (its id is not given again); returns the image's state."""
        self._check_name(name)
        data = self.service.folder_image(name)
        pixels = self.service.embed_upload(data, name)[0].image
        with self._lock:
            annotations = self._annotations[name]
            kept = [a for a in annotations if a["id"] != annotation_id]
            if len(kept) == len(annotations):
                raise RequestError(404, f"{name} has no annotation with id {annotation_id}; its ids are "
                                        f"{[a['id'] for a in annotations]}")
            next_id = self._next_id(name)
            if self._progress.get(self._stems[name], {}).get("next_id") != next_id:
                self._set_progress(name, next_id=next_id)  # first: the id stays taken whatever happens next
            self._write(name, data, pixels, kept)
            return self._state(name)

    def set_done(self, name: str, done: bool) -> dict:
        """Marks the image done (or not); returns its state."""
        self._check_name(name)
        with self._lock:
            self._set_progress(name, done=bool(done))
            return self._state(name)

    def reject(self, name: str, proposal: str, rejected: bool) -> dict:
        """Marks a proposal rejected (or takes the mark back); returns the image's state."""
        self._check_name(name)
        self._proposal(name, proposal)
        with self._lock:
            marked = [k for k in self._progress.get(self._stems[name], {}).get("rejected", []) if k != proposal]
            self._set_progress(name, rejected=marked + [proposal] if rejected else marked)
            return self._state(name)

    # ----------------------------------------------------------------------------- helpers

    def _check_name(self, name: str) -> None:
        if name not in self._stems:
            raise RequestError(404, f"{name!r} is not an image being annotated (those are the --images "
                                    "folder's images when the server started)")

    def _check_content(self, name: str, image_id: int) -> None:
        saved = self._image_ids.get(name)
        if saved is not None and saved != image_id:
            raise RequestError(409, f"{sa1b_writer.json_name(self._stems[name])} holds masks of other content "
                                    f"of {name} (image_id {saved}, the file's now {image_id}): move it out of "
                                    f"{self.folder} to annotate {name} afresh")

    def _proposal_result(self, name: str) -> dict:
        entry, _ = self.service.embed_folder_image(name)
        result = self.service.everything(entry.image_id, **self.proposal_settings)
        proposals = {}
        for record in result["records"]:
            proposals.setdefault(proposal_key(record), record)  # identical masks: one proposal
        return {"proposals": {key: {**record, "key": key} for key, record in proposals.items()},
                "seconds": result["seconds"], "settings": result["settings"]}

    def _proposal(self, name: str, key: str) -> dict:
        """The proposal `key`'s generator record (without its key)."""
        proposals = self._proposal_result(name)["proposals"]
        if key not in proposals:
            raise RequestError(404, f"{name} has no proposal {key!r} (with the server's proposal settings)")
        return {k: v for k, v in proposals[key].items() if k != "key"}

    def _prediction_record(self, image_id: str, prediction_id: str, index: int) -> dict:
        """A prediction's mask as an annotation record (SA-1B keys but id, and the prompt's)."""
        mask = self.service.chosen_mask(image_id, prediction_id, index)
        if mask["area"] == 0:
            raise RequestError(422, f"mask {index} of prediction {prediction_id!r} is empty: nothing to save")
        points, box = mask["point_coords"], mask["box"]
        if points is None and box is None:
            raise RequestError(422, f"prediction {prediction_id!r} has no point or box prompt: an SA-1B "
                                    "annotation needs a point (prompt with a click or a box)")
        h, w = mask["segmentation"]["size"]
        return {"segmentation": mask["segmentation"], "bbox": mask["bbox"], "area": mask["area"],
                "predicted_iou": mask["predicted_iou"],
                "point_coords": points if points is not None else [[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]],
                "crop_box": [0, 0, w, h], "stability_score": mask["stability_score"],
                "point_labels": mask["point_labels"] if points is not None else [], "box": box}

    @staticmethod
    def _check_fixed(record: dict, proposal: dict, prediction_id: str, key: str) -> None:
        first = record["point_coords"][0] if record["point_labels"] else None
        if first is None or record["point_labels"][0] != 1 or \
                max(abs(a - b) for a, b in zip(first, proposal["point_coords"][0])) > 1e-3:
            raise RequestError(422, f"prediction {prediction_id!r} does not start from proposal {key}'s point "
                                    f"{proposal['point_coords'][0]}: a fixed proposal's first click is its point")

    def _next_id(self, name: str) -> int:
        saved = max((a["id"] for a in self._annotations[name]), default=0) + 1
        return max(saved, self._progress.get(self._stems[name], {}).get("next_id", 1))

    def _done(self, name: str) -> bool:
        return bool(self._progress.get(self._stems[name], {}).get("done", False))

    def _marks(self, name: str) -> dict[str, str]:
        marks = {key: "rejected" for key in self._progress.get(self._stems[name], {}).get("rejected", [])}
        for a in self._annotations[name]:
            if a.get("proposal"):
                marks[a["proposal"]] = "accepted" if a.get("source") == "proposal" else "fixed"
        return marks

    def _counts(self) -> dict:
        return {"images": len(self.images), "images_done": sum(self._done(name) for name in self.images),
                "masks_saved": sum(len(a) for a in self._annotations.values())}

    def _state(self, name: str) -> dict:
        return {"image": name, "index": self.images.index(name), "done": self._done(name),
                "annotations": list(self._annotations[name]), "proposal_marks": self._marks(name),
                "progress": self._counts()}

    def _write(self, name: str, data: bytes, pixels, annotations: list[dict]) -> None:
        """The image's files for `annotations` (none: no files), then the memory."""
        stem, image_id = self._stems[name], sa1b_writer.stable_image_id(data)
        self._check_content(name, image_id)
        with saving(self.folder / sa1b_writer.json_name(stem)):
            if annotations:
                h, w = pixels.shape[:2]
                sa1b_writer.write_pair(
                    self.folder, stem,
                    lambda file_name: sa1b_writer.sa1b_record(image_id, file_name, h, w, annotations),
                    source=self.service.images_folder / name, pixels=pixels)
            else:
                sa1b_writer.remove_pair(self.folder, stem)
        if annotations:
            self._image_ids[name] = image_id
        else:
            self._image_ids.pop(name, None)
        self._annotations[name] = annotations

    def _set_progress(self, name: str, **changes) -> None:
        stem = self._stems[name]
        progress = {**self._progress, stem: {**self._progress.get(stem, {}), **changes}}
        with saving(self.folder / PROGRESS):
            self.folder.mkdir(parents=True, exist_ok=True)
            sa1b_writer.atomic_write(self.folder / PROGRESS, json.dumps({"images": progress}, indent=1).encode())
        self._progress = progress

    @staticmethod
    def _read_json(path: Path, *keys: str) -> dict:
        """The JSON object in `path`, which has `keys`; a ValueError naming the file if not."""
        try:
            record = sa1b_writer.read_record(path)
            problem = None if isinstance(record, dict) and all(k in record for k in keys) else f"it lacks {list(keys)}"
        except (OSError, ValueError) as err:
            problem = str(err)
        if problem:
            raise ValueError(f"{path} cannot be read back ({problem}): move it away to start afresh")
        return record
