"""`sam-jax serve --annotate`: the annotation store and its API (FastAPI's TestClient, in process)
with the tiny model. What is saved is compared with `SamPredictor` and the generator, read back
with the SA-1B reader, and prepared with `prepare_data sa1b`; ids, resuming, refusals, a failed
write and concurrent accepts."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from experiments import prepare_data
from experiments.sample_image import synthetic_image
from sam_jax.cli import main
from sam_jax.data import rle, sa1b_writer
from sam_jax.data.bad_records import BadRecordPolicy
from sam_jax.data.pipeline import open_source
from sam_jax.data.sa1b_reader import iter_examples, iter_folder
from sam_jax.image_io import read_image
from sam_jax.modeling import Sam
from sam_jax.predictor import SamPredictor
from sam_jax.serve.annotations import PROGRESS, AnnotationStore
from sam_jax.serve.api import create_app
from sam_jax.serve.service import SegmentationService
from sam_jax.utils.amg import calculate_stability_score
from sam_jax.weights import save_params
from test_serve_api import assert_error

H, W = 90, 120
NAMES = ("a.jpg", "b.jpg", "c.jpg")
# Small and permissive: proposals in a fraction of a second, some of them on the tiny model.
PROPOSALS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """RGB JPEGs without an EXIF rotation: the annotations folder links them as they are."""
    folder = tmp_path_factory.mktemp("annotate") / "images"
    folder.mkdir()
    for seed, name in enumerate(NAMES):
        Image.fromarray(synthetic_image(H, W, seed=seed + 20)).save(folder / name, quality=95)
    return folder


@pytest.fixture(scope="module")
def service(tiny, images):
    config, _, params = tiny
    service = SegmentationService(Sam(config), params, images_folder=str(images))
    service.warm_up()
    return service


@pytest.fixture
def store(service, tmp_path):
    return AnnotationStore(service, tmp_path / "annotations", PROPOSALS)


@pytest.fixture
def client(service, store):
    return TestClient(create_app(service, store))


@pytest.fixture(scope="module")
def predictors(service, images):
    out = {}
    for name in NAMES:
        out[name] = SamPredictor(service.model, service.params)
        out[name].set_image(read_image(images / name)[0])
    return out


def embed(client, name: str) -> str:
    return client.post("/embed", data={"name": name}).json()["image_id"]


def predict(client, name: str, **prompt) -> dict:
    response = client.post("/predict", json={"image_id": embed(client, name), **prompt})
    assert response.status_code == 200, response.text
    return response.json()


def accept(client, image: str, **body) -> dict:
    response = client.post("/annotate/accept", json={"image": image, **body})
    assert response.status_code == 200, response.text
    return response.json()


def saved(store, name: str) -> dict:
    return sa1b_writer.read_record(store.folder / sa1b_writer.json_name(name.rsplit(".", 1)[0]))


def decoded(annotation: dict) -> np.ndarray:
    return rle.decode(annotation["segmentation"]["counts"], annotation["segmentation"]["size"])


# ----------------------------------------------------------------------------- saving


def test_accept_saves_what_the_reader_reads(client, store, images, predictors):
    clicks, labels = [[40.5, 30.25], [90.0, 70.0]], [1, 0]
    prediction = predict(client, "a.jpg", point_coords=clicks, point_labels=labels)
    state = accept(client, "a.jpg", prediction_id=prediction["prediction_id"], index=2)
    masks, iou, _ = predictors["a.jpg"].predict(np.array(clicks), np.array(labels))
    logits, _, _ = predictors["a.jpg"].predict(np.array(clicks), np.array(labels), return_logits=True)

    record = saved(store, "a.jpg")
    data = (images / "a.jpg").read_bytes()
    assert record["image"] == {"image_id": sa1b_writer.stable_image_id(data), "width": W, "height": H,
                               "file_name": "sa_a.jpg"}
    assert (store.folder / "sa_a.jpg").read_bytes() == data
    (annotation,) = record["annotations"]
    assert annotation == state["annotation"] == state["annotations"][0]
    assert set(sa1b_writer.ANNOTATION_KEYS) <= set(annotation)
    np.testing.assert_array_equal(decoded(annotation), masks[2])
    assert annotation["segmentation"] == prediction["masks"][2]["segmentation"]  # what the page was sent
    assert annotation["id"] == 1 and annotation["area"] == masks[2].sum()
    assert annotation["bbox"] == prediction["masks"][2]["bbox"] and annotation["crop_box"] == [0, 0, W, H]
    np.testing.assert_allclose(annotation["predicted_iou"], iou[2], atol=1e-6)
    assert annotation["stability_score"] == float(calculate_stability_score(logits[2], 0.0, 1.0))
    assert (annotation["point_coords"], annotation["point_labels"]) == (clicks, labels)
    assert (annotation["box"], annotation["source"], annotation["proposal"]) == (None, "manual", None)

    policy = BadRecordPolicy("error")
    (key, example), = iter_folder(str(store.folder), "", policy)
    assert key == "sa_a.jpg" and example["image_id"] == record["image"]["image_id"]
    np.testing.assert_array_equal(rle.decode(example["masks"]["counts"][0], (H, W)), masks[2])
    assert [k for k, _ in iter_examples(str(store.folder), policy)] == ["sa_a.jpg"]  # .progress.json passed by


def test_box_and_feedback_prompts(client, store, predictors):
    box = [10.0, 5.0, 100.0, 80.0]
    first = predict(client, "b.jpg", box=box)
    state = accept(client, "b.jpg", prediction_id=first["prediction_id"], index=0)
    annotation = state["annotation"]
    assert annotation["point_coords"] == [[55.0, 42.5]] and annotation["point_labels"] == []
    assert annotation["box"] == box
    logits, _, low_res = predictors["b.jpg"].predict(box=np.array(box), return_logits=True)
    assert annotation["stability_score"] == float(calculate_stability_score(logits[0], 0.0, 1.0))

    # a click fed back with the box's mask 1: the stability of that prompt's logits
    refined = predict(client, "b.jpg", point_coords=[[30, 20]], point_labels=[1], box=box,
                      mask_input={"prediction_id": first["prediction_id"], "index": 1})
    annotation = accept(client, "b.jpg", prediction_id=refined["prediction_id"], index=1)["annotation"]
    masks, _, _ = predictors["b.jpg"].predict(np.array([[30, 20]]), np.array([1]), np.array(box), low_res[1][None])
    logits, _, _ = predictors["b.jpg"].predict(np.array([[30, 20]]), np.array([1]), np.array(box), low_res[1][None],
                                               return_logits=True)
    np.testing.assert_array_equal(decoded(annotation), masks[1])
    assert annotation["stability_score"] == float(calculate_stability_score(logits[1], 0.0, 1.0))
    assert annotation["id"] == 2 and annotation["box"] == box and annotation["point_labels"] == [1]


def test_delete_and_ids_are_never_given_twice(client, store):
    prediction = predict(client, "a.jpg", point_coords=[[60, 45]], point_labels=[1])
    for index in range(3):
        accept(client, "a.jpg", prediction_id=prediction["prediction_id"], index=index)
    delete = lambda i: client.post("/annotate/delete", json={"image": "a.jpg", "id": i})
    assert [a["id"] for a in delete(3).json()["annotations"]] == [1, 2]
    assert_error(delete(3), 404, "a.jpg has no annotation with id 3; its ids are [1, 2]")
    again = accept(client, "a.jpg", prediction_id=prediction["prediction_id"], index=2)
    assert again["annotation"]["id"] == 4  # 3 was deleted: not given again
    assert [a["id"] for a in saved(store, "a.jpg")["annotations"]] == [1, 2, 4]
    for i in (1, 2, 4):
        state = delete(i).json()
    # no masks left: no files (the reader refuses a JSON without masks), and 5 is next
    assert state["annotations"] == [] and sorted(p.name for p in store.folder.iterdir()) == [PROGRESS]
    restarted = TestClient(create_app(store.service, AnnotationStore(store.service, store.folder, PROPOSALS)))
    assert accept(restarted, "a.jpg", prediction_id=prediction["prediction_id"], index=0)["annotation"]["id"] == 5


def test_proposals_accepted_rejected_and_fixed(client, store, service):
    listed = client.get("/annotate/proposals", params={"image": "c.jpg"}).json()
    proposals = listed["proposals"]
    assert len(proposals) >= 3 and listed["proposal_marks"] == {} and listed["settings"]["points_per_side"] == 4
    expected = service.everything(embed(client, "c.jpg"), **PROPOSALS)["records"]
    assert [p["segmentation"] for p in proposals] == list({r["segmentation"]["counts"]: r["segmentation"]
                                                          for r in expected}.values())
    first, second, third = proposals[:3]

    annotation = accept(client, "c.jpg", proposal=first["key"])["annotation"]
    for key in ("segmentation", "bbox", "area", "predicted_iou", "point_coords", "crop_box", "stability_score"):
        assert annotation[key] == first[key], key
    assert (annotation["source"], annotation["proposal"], annotation["point_labels"]) == ("proposal", first["key"], [1])
    assert_error(client.post("/annotate/accept", json={"image": "c.jpg", "proposal": first["key"]}), 409,
                 "c.jpg: this mask is already saved, as annotation 1")

    reject = lambda key, rejected=True: client.post("/annotate/reject", json={
        "image": "c.jpg", "proposal": key, "rejected": rejected}).json()["proposal_marks"]
    assert reject(second["key"]) == {first["key"]: "accepted", second["key"]: "rejected"}
    assert reject(second["key"], False) == {first["key"]: "accepted"}
    assert reject(second["key"]) == {first["key"]: "accepted", second["key"]: "rejected"}

    # fixed: its point as the first click, one more click, then accepted
    (x, y), = third["point_coords"]
    start = predict(client, "c.jpg", point_coords=[[x, y]], point_labels=[1])
    fixed = predict(client, "c.jpg", point_coords=[[x, y], [5, 5]], point_labels=[1, 0],
                    mask_input={"prediction_id": start["prediction_id"], "index": 0})
    state = accept(client, "c.jpg", prediction_id=fixed["prediction_id"], index=0, proposal=third["key"])
    assert (state["annotation"]["source"], state["annotation"]["proposal"]) == ("proposal_fixed", third["key"])
    assert state["annotation"]["segmentation"] == fixed["masks"][0]["segmentation"]
    assert state["proposal_marks"][third["key"]] == "fixed"
    elsewhere = predict(client, "c.jpg", point_coords=[[5, 5]], point_labels=[1])
    assert_error(client.post("/annotate/accept", json={"image": "c.jpg", "prediction_id": elsewhere["prediction_id"],
                                                       "index": 0, "proposal": third["key"]}), 422,
                 f"does not start from proposal {third['key']}'s point")
    assert [a["source"] for a in saved(store, "c.jpg")["annotations"]] == ["proposal", "proposal_fixed"]


def test_done_and_resume_after_a_restart(client, store, service):
    assert client.get("/annotate/state").json()["first_open"] == 0
    # a.jpg done without masks: only the progress file says so (no JSON without masks)
    assert client.post("/annotate/done", json={"image": "a.jpg"}).json()["done"] is True
    assert not (store.folder / "sa_a.json").exists()
    prediction = predict(client, "b.jpg", point_coords=[[60, 45]], point_labels=[1])
    accept(client, "b.jpg", prediction_id=prediction["prediction_id"], index=1)
    proposal = client.get("/annotate/proposals", params={"image": "b.jpg"}).json()["proposals"][0]["key"]
    client.post("/annotate/reject", json={"image": "b.jpg", "proposal": proposal})
    before = client.get("/annotate/state").json()
    assert before["first_open"] == 1 and before["progress"] == {"images": 3, "images_done": 1, "masks_saved": 1}

    restarted = TestClient(create_app(service, AnnotationStore(service, store.folder, PROPOSALS)))
    assert restarted.get("/annotate/state").json() == before
    for name in NAMES:
        assert restarted.get("/annotate/image", params={"image": name}).json() == \
            client.get("/annotate/image", params={"image": name}).json()
    assert restarted.get("/annotate/image", params={"image": "b.jpg"}).json()["proposal_marks"] == {
        proposal: "rejected"}
    restarted.post("/annotate/done", json={"image": "b.jpg"})
    restarted.post("/annotate/done", json={"image": "c.jpg"})
    assert restarted.get("/annotate/state").json()["first_open"] is None  # all done
    assert restarted.post("/annotate/done", json={"image": "a.jpg", "done": False}).json()["done"] is False


def test_a_failed_write_leaves_the_previous_json(client, store, monkeypatch):
    prediction = predict(client, "a.jpg", point_coords=[[60, 45]], point_labels=[1])
    accept(client, "a.jpg", prediction_id=prediction["prediction_id"], index=0)
    before = (store.folder / "sa_a.json").read_bytes()
    replace = sa1b_writer.os.replace

    def failing_replace(source, target):
        if str(target).endswith(".json"):
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(sa1b_writer.os, "replace", failing_replace)
    response = client.post("/annotate/accept", json={"image": "a.jpg", "prediction_id": prediction["prediction_id"],
                                                     "index": 1})
    assert_error(response, 500, "sa_a.json cannot be saved", "No space left on device",
                 "the files are as they were")
    assert (store.folder / "sa_a.json").read_bytes() == before
    assert not [p.name for p in store.folder.iterdir() if p.name.endswith(".tmp")]
    assert len(client.get("/annotate/image", params={"image": "a.jpg"}).json()["annotations"]) == 1
    monkeypatch.setattr(sa1b_writer.os, "replace", replace)
    assert accept(client, "a.jpg", prediction_id=prediction["prediction_id"], index=1)["annotation"]["id"] == 2


def test_concurrent_accepts_keep_every_mask(client, store):
    predictions = [predict(client, "b.jpg", point_coords=[[10 + 12 * i, 40]], point_labels=[1]) for i in range(6)]
    results = [None] * len(predictions)

    def send(i):
        results[i] = client.post("/annotate/accept", json={
            "image": "b.jpg", "prediction_id": predictions[i]["prediction_id"], "index": 0})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(predictions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = {p["masks"][0]["segmentation"]["counts"] for p in predictions}  # some clicks may give one mask
    assert sorted(r.status_code for r in results) == [200] * len(fresh) + [409] * (len(predictions) - len(fresh))
    annotations = saved(store, "b.jpg")["annotations"]
    assert sorted(a["id"] for a in annotations) == list(range(1, len(fresh) + 1))
    assert {a["segmentation"]["counts"] for a in annotations} == fresh


# ----------------------------------------------------------------------------- refusals


def test_refusals_name_the_problem(client, store, service, images):
    prediction = predict(client, "a.jpg", point_coords=[[60, 45]], point_labels=[1])
    body = {"image": "a.jpg", "prediction_id": prediction["prediction_id"], "index": 0}
    post = lambda path, **changes: client.post(path, json={**body, **changes})
    assert_error(post("/annotate/accept", image="nope.jpg"), 404, "'nope.jpg' is not an image being annotated")
    assert_error(client.get("/annotate/image", params={"image": "../a.jpg"}), 404, "is not an image being annotated")
    assert_error(client.get("/annotate/image"), 422, "image: Field required")
    assert_error(post("/annotate/accept", prediction_id="made-up"), 422,
                 "prediction_id 'made-up' is not a prediction on this image")
    assert_error(post("/annotate/accept", image="b.jpg"), 422, "is not a prediction on this image")
    assert_error(post("/annotate/accept", index=3), 422, "index 3 is out of range: that prediction has 3 masks")
    assert_error(post("/annotate/accept", index=None), 422, "give prediction_id and index")
    assert_error(post("/annotate/accept", index=None, prediction_id=None, proposal="0123456789ab"), 404,
                 "a.jpg has no proposal '0123456789ab'")
    assert_error(post("/annotate/accept", colour="red"), 422, "colour: Extra inputs are not permitted")
    assert_error(client.post("/annotate/delete", json={"image": "a.jpg", "id": 7}), 404,
                 "a.jpg has no annotation with id 7")
    assert_error(client.post("/annotate/reject", json={"image": "a.jpg", "proposal": "x"}), 404, "no proposal 'x'")
    assert_error(TestClient(create_app(service)).get("/annotate/state"), 404, "started without --annotate")
    assert client.get("/api/info").json()["annotate"] is True

    # masks saved for other content of a file are not mixed with new ones
    accept(client, "a.jpg", prediction_id=prediction["prediction_id"], index=0)
    record = saved(store, "a.jpg")
    record["image"]["image_id"] += 1
    (store.folder / "sa_a.json").write_text(json.dumps(record))
    assert_error(TestClient(create_app(service, AnnotationStore(service, store.folder))).get(
        "/annotate/image", params={"image": "a.jpg"}), 409, "sa_a.json holds masks of other content of a.jpg")


def test_store_refusals(service, images, tmp_path):
    with pytest.raises(ValueError, match="is the --images folder"):
        AnnotationStore(service, images)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file exists and is not a folder"):
        AnnotationStore(service, tmp_path / "file")
    with pytest.raises(ValueError, match=r"unknown proposal settings \['points'\]"):
        AnnotationStore(service, tmp_path, {"points": 4})
    (tmp_path / "sa_a.json").write_text("{not json")
    with pytest.raises(ValueError, match="sa_a.json cannot be read back"):
        AnnotationStore(service, tmp_path)
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("x.jpg", "x.png"):
        Image.fromarray(synthetic_image(20, 20)).save(twins / name)
    with pytest.raises(ValueError, match="x.jpg and x.png would both be saved as sa_x.json"):
        AnnotationStore(SegmentationService(service.model, service.params, images_folder=str(twins)), tmp_path / "t")


# ----------------------------------------------------------------------------- the loop


def test_annotations_prepare_as_sa1b(client, store, tmp_path, capsys):
    """annotate -> `prepare_data sa1b --manual-dir` -> the prepared records: the masks saved."""
    masks = {}
    for name, index in (("a.jpg", 0), ("c.jpg", 2)):
        prediction = predict(client, name, point_coords=[[60, 45]], point_labels=[1])
        accept(client, name, prediction_id=prediction["prediction_id"], index=index)
        masks[name] = decoded(saved(store, name)["annotations"][0])
    client.post("/annotate/done", json={"image": "b.jpg"})  # done, no masks: not a record
    data_dir = tmp_path / "prepared"
    assert prepare_data.main(["sa1b", "--manual-dir", str(store.folder), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('{\n  "dataset"'):])
    assert summary["splits"] == {"train": 2} and summary["bad_records"]["train"]["skipped"] == {}
    source = open_source("sa1b", "train", data_dir=str(data_dir))
    records = {source[i]["file_name"].decode(): source[i] for i in range(len(source))}
    assert sorted(records) == ["sa_a.jpg", "sa_c.jpg"]
    for name, mask in masks.items():
        record = records["sa_" + name]
        assert record["image"].shape == (H, W, 3)
        np.testing.assert_array_equal(rle.decode_many(record["masks"]["counts"], (H, W))[0], mask)
        assert record["masks"]["stability_score"][0] == np.float32(saved(store, name)["annotations"][0]
                                                                   ["stability_score"])


# ----------------------------------------------------------------------------- the command line


def test_command_line(capsys, tmp_path, images, service, monkeypatch):
    checkpoint = str(save_params(tmp_path / "ckpt", service.params, service.model.config))
    for args, message in (
            (["--annotate"], "--annotate needs --images"),
            (["--images", str(images), "--annotations", str(tmp_path)], "go with --annotate"),
            (["--images", str(images), "--annotate", "--proposal-setting", "points=4"], "expected NAME=VALUE"),
            (["--images", str(images), "--annotate", "--proposal-setting", "points_per_side=x"], "is not an integer"),
            (["--images", str(images), "--annotate", "--annotations", str(images)], "is the --images folder")):
        assert main(["serve", "--checkpoint", checkpoint, "--port", "0", *args]) == 2
        assert message in capsys.readouterr().err, args

    import uvicorn

    apps = []  # the app the command would serve
    monkeypatch.setattr(uvicorn, "Config", lambda app, **_: SimpleNamespace(app=app))
    monkeypatch.setattr(uvicorn, "Server", lambda config: SimpleNamespace(run=lambda sockets: apps.append(config.app)))
    monkeypatch.setattr(SegmentationService, "warm_up_decoder", lambda self: None)
    assert main(["serve", "--checkpoint", checkpoint, "--port", "0", "--images", str(images), "--annotate",
                 "--proposal-setting", "points_per_side=4"]) == 0
    assert "annotating 3 images into" in capsys.readouterr().err
    state = TestClient(apps[0]).get("/annotate/state").json()
    assert state["folder"] == str(images / "annotations") and state["proposal_settings"]["points_per_side"] == 4
