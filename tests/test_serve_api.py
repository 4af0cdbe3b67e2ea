"""`sam-jax serve`'s JSON API (FastAPI's TestClient, in process) and its pieces, with the tiny
model: every endpoint against `SamPredictor` / `SamAutomaticMaskGenerator`, every refusal
(a status and a message naming the problem), the embedding cache, and the command line."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from experiments.sample_image import synthetic_image
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.cli import main
from sam_jax.image_io import read_image
from sam_jax.modeling import Sam, decode_low_res
from sam_jax.predictor import SamPredictor
from sam_jax.serve.api import create_app
from sam_jax.serve.cache import ByteLRU
from sam_jax.serve.service import SegmentationService
from sam_jax.weights import save_params

H, W = 90, 120


def png_bytes(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_and_params(tiny):
    config, _, params = tiny
    return Sam(config), params


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """scene.png and other.png; a hidden file, a text file, a subfolder and a link out of it."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "scene.png").write_bytes(png_bytes(synthetic_image(H, W, seed=5)))
    (folder / "other.png").write_bytes(png_bytes(synthetic_image(H, W, seed=6)))
    (folder / ".hidden.png").write_bytes(png_bytes(synthetic_image(H, W, seed=7)))
    (folder / "sub" / "inner.png").write_bytes(png_bytes(synthetic_image(H, W, seed=8)))
    (folder / "notes.txt").write_text("not an image")
    (root / "secret.png").write_bytes(png_bytes(synthetic_image(H, W, seed=9)))
    os.symlink(root / "secret.png", folder / "link.png")
    return folder


@pytest.fixture(scope="module")
def service(model_and_params, folder):
    service = SegmentationService(*model_and_params, images_folder=str(folder), max_upload_bytes=200_000,
                                  max_image_pixels=1_000_000)
    service.warm_up()
    return service


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def scene(folder):
    return (folder / "scene.png").read_bytes()


@pytest.fixture(scope="module")
def scene_id(client, scene):
    response = client.post("/embed", files={"file": ("scene.png", scene, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()["image_id"]


@pytest.fixture(scope="module")
def predictor(model_and_params, folder):
    predictor = SamPredictor(*model_and_params)
    predictor.set_image(read_image(folder / "scene.png")[0])
    return predictor


def decode(record: dict) -> np.ndarray:
    rle = record["segmentation"]
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "Traceback" not in detail
    for word in words:
        assert word in detail, (word, detail)


# ----------------------------------------------------------------------------- endpoints


def test_info_images_page_and_docs(client, folder):
    info = client.get("/api/info").json()
    assert info["model_type"] == "vit_tiny" and info["images_folder"] is True
    assert info["max_upload_bytes"] == 200_000
    # only image files directly in the folder: no hidden file, subfolder, text file, or link out of it
    assert client.get("/api/images").json() == {"images": ["other.png", "scene.png"]}
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/embed", "/predict", "/everything", "/image/{image_id}", "/api/info", "/api/images"} <= set(paths)


def test_embed_once_per_content(client, service, scene, scene_id):
    again = client.post("/embed", files={"file": ("renamed.png", scene, "image/png")}).json()
    assert again["image_id"] == scene_id and again["cached"] is True
    assert again["name"] == "renamed.png"  # the caller's name: names are not shared
    picked = client.post("/embed", data={"name": "scene.png"}).json()
    assert picked["image_id"] == scene_id and picked["cached"] is True
    assert (picked["width"], picked["height"], picked["mode"]) == (W, H, "RGB")
    shown = np.asarray(Image.open(io.BytesIO(client.get(f"/image/{scene_id}").content)))
    np.testing.assert_array_equal(shown, synthetic_image(H, W, seed=5))


def test_concurrent_requests_for_one_image_encode_it_once(model_and_params):
    service = SegmentationService(*model_and_params)
    calls = []
    encode = service._encode

    def slow_encode(*args):
        calls.append(args[0])
        time.sleep(0.5)  # every request arrives while the first one encodes
        return encode(*args)

    service._encode = slow_encode
    data = png_bytes(synthetic_image(H, W, seed=11))
    results = [None] * 4

    def request(i):
        results[i] = service.embed_upload(data, f"copy{i}.png")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(computed for _, computed in results) == [False, False, False, True]
    assert len({id(entry) for entry, _ in results}) == 1


def test_predict_equals_the_predictor(client, scene_id, predictor):
    body = {"image_id": scene_id, "point_coords": [[40.5, 30.25], [90, 70]], "point_labels": [1, 0]}
    result = client.post("/predict", json=body).json()
    masks, iou, low_res = predictor.predict(np.array(body["point_coords"]), np.array([1, 0]))
    assert len(result["masks"]) == 3
    for record, mask, score in zip(result["masks"], masks, iou):
        np.testing.assert_array_equal(decode(record), mask)
        assert record["area"] == mask.sum()
        np.testing.assert_allclose(record["predicted_iou"], score, atol=1e-6)
        ys, xs = np.nonzero(mask)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]

    # fed back: the earlier prediction's logits as mask_input
    best = int(np.argmax(iou))
    refined = client.post("/predict", json={
        "image_id": scene_id, "point_coords": [[40.5, 30.25]], "point_labels": [1], "box": [10, 5, 100, 80],
        "mask_input": {"prediction_id": result["prediction_id"], "index": best}, "multimask_output": False,
    }).json()
    masks, iou, _ = predictor.predict(np.array([[40.5, 30.25]]), np.array([1]), np.array([10, 5, 100, 80]),
                                      low_res[best][None], multimask_output=False)
    assert len(refined["masks"]) == 1
    np.testing.assert_array_equal(decode(refined["masks"][0]), masks[0])
    np.testing.assert_allclose(refined["masks"][0]["predicted_iou"], iou[0], atol=1e-6)

    preview = client.post("/predict", json={"image_id": scene_id, "box": [10, 5, 100, 80],
                                            "store_logits": False}).json()
    assert preview["prediction_id"] is None
    masks, _, _ = predictor.predict(box=np.array([10, 5, 100, 80]))
    np.testing.assert_array_equal(decode(preview["masks"][1]), masks[1])


def test_warmed_up_decoder_serves_clicks_without_compiling(model_and_params, folder):
    """`warm_up_decoder` compiles the decoder as the clicks call it (with the service's positional
    encoding, `SamPredictor.image_pe`), so a first click, a second and a box compile nothing."""
    service = SegmentationService(*model_and_params, images_folder=str(folder))
    image_id = service.embed_folder_image("scene.png")[0].image_id
    service.warm_up_decoder()
    compiled = decode_low_res._cache_size()
    service.predict(image_id, point_coords=[[40, 30]], point_labels=[1])
    service.predict(image_id, point_coords=[[40, 30], [90, 70]], point_labels=[1, 0])
    service.predict(image_id, box=[10, 5, 100, 80])
    assert decode_low_res._cache_size() == compiled


def test_everything_equals_the_generator(client, scene_id, model_and_params, folder):
    settings = {"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0, "box_nms_thresh": 1}
    first = client.post("/everything", json={"image_id": scene_id, **settings}).json()
    generator = SamAutomaticMaskGenerator(*model_and_params, output_mode="coco_rle", **settings)
    expected = generator.generate(read_image(folder / "scene.png")[0])
    assert len(first["records"]) == len(expected) > 1
    for got, want in zip(first["records"], expected):
        assert set(got) == set(want)
        for key in ("segmentation", "area", "bbox", "point_coords", "crop_box"):
            assert got[key] == want[key], key
        np.testing.assert_allclose([got["predicted_iou"], got["stability_score"]],
                                   [want["predicted_iou"], want["stability_score"]], atol=1e-6)
    assert first["settings"]["points_per_side"] == 4 and first["settings"]["crop_n_layers"] == 0
    again = client.post("/everything", json={"image_id": scene_id, **settings}).json()
    assert again == first  # cached: the same result, not recomputed


# ----------------------------------------------------------------------------- refusals


def test_folder_names_outside_the_list_are_refused(client, folder):
    for name in ("../secret.png", str(folder.parent / "secret.png"), "sub/inner.png", ".hidden.png",
                 "link.png", "notes.txt", "missing.png", "..", ""):
        assert_error(client.post("/embed", data={"name": name}), 404 if name else 422,
                     *((f"{name!r} is not an image in the --images folder",) if name else ()))


def test_upload_refusals(client, tmp_path):
    assert_error(client.post("/embed", files={"file": ("big.png", b"0" * 300_000, "image/png")}), 413,
                 "over the 200,000-byte limit")
    assert_error(client.post("/embed", files={"file": ("notes.png", b"not an image", "image/png")}), 415,
                 "notes.png: not an image")
    assert_error(client.post("/embed", files={"file": ("empty.png", b"", "image/png")}), 415, "empty.png: empty file")
    truncated = png_bytes(synthetic_image(H, W, seed=1))[:400]
    assert_error(client.post("/embed", files={"file": ("cut.png", truncated, "image/png")}), 415,
                 "cut.png: corrupt or truncated image")
    # a decompression bomb: 25 megapixels in a few kB, refused from its header
    bomb = png_bytes(np.zeros((5000, 5000), bool), optimize=True)
    assert len(bomb) < 200_000
    assert_error(client.post("/embed", files={"file": ("bomb.png", bomb, "image/png")}), 413,
                 "bomb.png: 5000x5000 image is too large", "the limit is 1,000,000")
    Image.fromarray(np.ones((4, 4), np.int32)).save(tmp_path / "int.tif")
    assert_error(client.post("/embed", files={"file": ("int.tif", (tmp_path / "int.tif").read_bytes())}), 415,
                 "32-bit integer image (mode I)")
    assert_error(client.post("/embed"), 422, "exactly one of `file`")
    assert_error(client.post("/embed", files={"file": ("a.png", b"x")}, data={"name": "scene.png"}), 422,
                 "exactly one of `file`")


def test_image_modes_are_read_as_segment_reads_them(client, tmp_path):
    rgb = synthetic_image(H, W, seed=12)
    images = {
        "I;16": Image.fromarray(np.random.default_rng(0).integers(0, 65536, (H, W)).astype(np.uint16)),
        "P": Image.fromarray(rgb).convert("P"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "L": Image.fromarray(rgb).convert("L"),
    }
    for mode, image in images.items():
        path = tmp_path / f"{mode.replace(';', '_')}.{'jpg' if mode == 'CMYK' else 'png'}"
        image.save(path)
        response = client.post("/embed", files={"file": (path.name, path.read_bytes())})
        assert response.status_code == 200, (mode, response.text)
        assert response.json()["mode"] == mode
        shown = np.asarray(Image.open(io.BytesIO(client.get(f"/image/{response.json()['image_id']}").content)))
        np.testing.assert_array_equal(shown, read_image(path)[0], err_msg=mode)


@pytest.mark.parametrize("body, words", [
    ({"point_coords": [[10, "x"]], "point_labels": [1]}, ["point_coords.0.1: Input should be a valid number"]),
    ({"point_coords": [[10, 20, 30]], "point_labels": [1]}, ["point_coords.0"]),
    ({"point_coords": [[10, 20]], "point_labels": [2]}, ["point_labels.0: Input should be 0 or 1"]),
    ({"point_coords": [[10, 20]], "point_labels": [1, 0]}, ["point_labels: 2 labels for 1 points"]),
    ({"point_coords": [[10, 20]] * 65, "point_labels": [1] * 65}, ["point_coords: List should have at most 64"]),
    ({"point_coords": [[500, 20]], "point_labels": [1]}, ["point (500, 20) is outside the 120x90 image image_id"]),
    ({"box": [50, 50, 10, 10]}, ["box must be XYXY with x1 >= x0"]),
    ({"box": [0, 0, 10]}, ["box"]),
    ({}, ["no prompt"]),
    ({"box": [0, 0, 10, 10], "colour": "red"}, ["colour: Extra inputs are not permitted"]),
    ({"box": [0, 0, 10, 10], "mask_input": {"prediction_id": "made-up", "index": 0}},
     ["mask_input.prediction_id 'made-up' is not a prediction on this image"]),
    ({"box": [0, 0, 10, 10], "mask_input": {"prediction_id": "x", "index": -1}},
     ["mask_input.index: Input should be greater than or equal to 0"]),
])
def test_malformed_prompts_are_422_naming_the_field(client, scene_id, body, words):
    assert_error(client.post("/predict", json={"image_id": scene_id, **body}), 422, *words)


def test_other_predict_refusals(client, scene_id, scene):
    raw = lambda text: client.post("/predict", content=text, headers={"content-type": "application/json"})
    assert_error(raw(b'{"image_id": '), 422, "body is not valid JSON")
    assert_error(raw(json.dumps({"image_id": scene_id, "box": [0, 0, 10, float("nan")]}).encode()), 422, "box.3")
    assert_error(client.post("/predict", json={"image_id": "0" * 64, "box": [0, 0, 5, 5]}), 404,
                 "is not embedded (or was evicted from the cache)")
    assert_error(client.get(f"/image/{'0' * 64}"), 404, "is not embedded")
    # a prediction on one image cannot be fed to another: nothing crosses between images
    other = client.post("/embed", data={"name": "other.png"}).json()["image_id"]
    elsewhere = client.post("/predict", json={"image_id": other, "box": [0, 0, 50, 50]}).json()
    assert_error(client.post("/predict", json={"image_id": scene_id, "box": [0, 0, 50, 50], "mask_input": {
        "prediction_id": elsewhere["prediction_id"], "index": 0}}), 422, "is not a prediction on this image")
    assert_error(client.post("/predict", json={"image_id": other, "box": [0, 0, 50, 50], "mask_input": {
        "prediction_id": elsewhere["prediction_id"], "index": 3}}), 422,
        "mask_input.index 3 is out of range: that prediction has 3 masks")
    # the everything settings
    assert_error(client.post("/everything", json={"image_id": scene_id, "points_per_side": 0}), 422,
                 "points_per_side: Input should be greater than or equal to 1")
    assert_error(client.post("/everything", json={"image_id": scene_id, "crop_n_layers": 4}), 422,
                 "crop_n_layers: Input should be less than or equal to 3")
    assert_error(client.post("/everything", json={"image_id": "nope"}), 404, "'nope' is not embedded")
    # and the server goes on serving
    assert client.post("/predict", json={"image_id": scene_id, "box": [0, 0, 50, 50]}).status_code == 200


# ----------------------------------------------------------------------------- the cache


def test_byte_lru_evicts_least_recently_used():
    cache = ByteLRU(10, size_of=len)
    cache.put("a", "xxxx")
    cache.put("b", "xxxx")
    assert cache.get("a") == "xxxx"  # a is now the most recent
    cache.put("c", "xxxx")  # 12 bytes: b goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and cache.nbytes == 8
    cache.put("d", "x" * 20)  # larger than the bound alone: kept, everything else goes
    assert len(cache) == 1 and cache.get("d") and cache.nbytes == 20


def test_byte_lru_failed_compute_is_not_cached():
    cache = ByteLRU(100, size_of=len)

    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        cache.get_or_compute("k", fail)
    assert cache.get_or_compute("k", lambda: "ok") == ("ok", True)


def test_embeddings_evicted_past_the_byte_bound(model_and_params):
    one = SegmentationService(*model_and_params).embed_upload(png_bytes(synthetic_image(H, W)), "a.png")[0]
    service = SegmentationService(*model_and_params, cache_bytes=int(1.5 * one.nbytes))
    client = TestClient(create_app(service))
    ids = [client.post("/embed", files={"file": (f"{i}.png", png_bytes(synthetic_image(H, W, seed=i)))}).json()
           ["image_id"] for i in range(2)]
    assert len(service.embeddings) == 1 and service.embeddings.nbytes <= service.embeddings.max_bytes
    assert_error(client.post("/predict", json={"image_id": ids[0], "box": [0, 0, 9, 9]}), 404, "evicted")
    assert client.post("/predict", json={"image_id": ids[1], "box": [0, 0, 9, 9]}).status_code == 200


# ----------------------------------------------------------------------------- the command line


def test_serve_command_line_errors(capsys, tmp_path, model_and_params):
    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope: no such checkpoint directory" in capsys.readouterr().err
    model, params = model_and_params
    checkpoint = save_params(tmp_path / "ckpt", params, model.config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sam-jax: error: --host 127.0.0.1 --port {port}: cannot listen there") and "\n" not in err
    assert main(["serve", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "none")]) == 2
    assert "--images" in capsys.readouterr().err
