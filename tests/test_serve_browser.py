"""`sam-jax serve` end to end in a real browser: headless Chromium (Debian's package, through
selenium and chromedriver) on the page of a live `sam-jax serve` subprocess on 127.0.0.1, with
the tiny model. What the page draws on its mask canvas is compared with `SamPredictor` and
`SamAutomaticMaskGenerator` on the same image and prompts. The tests run in order on one page."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import make_official
from experiments.sample_image import synthetic_image
from experiments.serve_browser import (LiveServer, canvas_alpha, click_at, drag, open_image, png_data_url,
                                       start_browser, wait_for, wait_for_prediction)
from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator
from sam_jax.modeling import Sam
from sam_jax.predictor import SamPredictor
from sam_jax.weights import save_params

HEIGHT, WIDTH = 900, 1200  # shown scaled down on the page's 1280x900 window


@pytest.fixture(scope="module")
def model_and_params():
    config, _, params = make_official("vit_tiny")
    return Sam(config), params


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    path = folder / "scene.png"
    Image.fromarray(synthetic_image(HEIGHT, WIDTH, seed=3)).save(path)
    return path


@pytest.fixture(scope="module")
def predictor(model_and_params, image_file):
    predictor = SamPredictor(*model_and_params)
    predictor.set_image(np.asarray(Image.open(image_file).convert("RGB")))
    return predictor


@pytest.fixture(scope="module")
def server(model_and_params, image_file, tmp_path_factory):
    model, params = model_and_params
    checkpoint = save_params(tmp_path_factory.mktemp("ckpt") / "vit_tiny", params, model.config, source="test")
    live = LiveServer(checkpoint, images=image_file.parent)
    yield live
    live.stop()


def browser_on(url: str, profile):
    """A fixture's body: headless Chromium (a fresh profile in `profile`) on `url`, quit after."""
    driver = start_browser(profile)
    driver.get(url)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    yield from browser_on(server.url, tmp_path_factory.mktemp("chromium-profile"))


def test_upload_and_embed(page, image_file):
    image = open_image(page, image_file)
    assert image["width"] == WIDTH and image["height"] == HEIGHT and image["name"] == "scene.png"
    shown = page.execute_script("const r = document.getElementById('prompts').getBoundingClientRect(); return r.width;")
    assert shown < WIDTH, "the test means the page to scale the image down"
    drawn = png_data_url(page.execute_script("return document.getElementById('image').toDataURL('image/png');"))
    np.testing.assert_array_equal(drawn[..., :3], np.asarray(Image.open(image_file).convert("RGB")))


def check_mask(page, prediction, expected_masks, expected_iou):
    """The page chose the highest predicted IoU, and drew exactly that mask."""
    best = int(np.argmax(expected_iou))
    assert prediction["selected"] == best
    np.testing.assert_allclose([m["predicted_iou"] for m in prediction["masks"]], expected_iou, atol=1e-5)
    drawn = canvas_alpha(page)
    np.testing.assert_array_equal(drawn, expected_masks[best])
    assert drawn.any()


def test_click_draws_the_predictor_mask(page, predictor):
    click_at(page, 450, 375)
    prediction = wait_for_prediction(page, None)
    body = prediction["prompt"]
    (x, y), = body["point_coords"]
    assert abs(x - 450) < 1.5 and abs(y - 375) < 1.5 and body["point_labels"] == [1]
    assert "mask_input" not in body
    masks, iou, _ = predictor.predict(np.array(body["point_coords"]), np.array(body["point_labels"]))
    check_mask(page, prediction, masks, iou)
    assert float(page.execute_script("return document.body.dataset.latencyMs")) > 0


def test_background_click_feeds_back_the_last_logits(page, predictor):
    first = page.execute_script("return window.samJax.state.prediction;")
    click_at(page, 780, 630, background=True)
    prediction = wait_for_prediction(page, first["prediction_id"])
    body = prediction["prompt"]
    assert body["point_labels"] == [1, 0]
    assert body["mask_input"] == {"prediction_id": first["prediction_id"], "index": first["selected"]}
    _, _, low_res = predictor.predict(np.array(first["prompt"]["point_coords"]), np.array([1]))
    masks, iou, _ = predictor.predict(np.array(body["point_coords"]), np.array([1, 0]),
                                      mask_input=low_res[first["selected"]][None])
    check_mask(page, prediction, masks, iou)


def test_candidate_pick_and_undo(page, predictor):
    prediction = page.execute_script("return window.samJax.state.prediction;")
    other = (prediction["selected"] + 1) % 3
    page.find_element("css selector", f"#candidates li[data-index='{other}']").click()
    wait_for(page, f"document.getElementById('mask').dataset.selected === '{other}'")
    body = prediction["prompt"]
    first = page.execute_script("return window.samJax.state.history[1].prediction;")
    _, _, low_res = predictor.predict(np.array(first["prompt"]["point_coords"]), np.array([1]))
    masks, _, _ = predictor.predict(np.array(body["point_coords"]), np.array([1, 0]),
                                    mask_input=low_res[first["selected"]][None])
    np.testing.assert_array_equal(canvas_alpha(page), masks[other])

    page.find_element("id", "undo").click()
    wait_for(page, f"document.getElementById('mask').dataset.predictionId === {json.dumps(first['prediction_id'])}")
    assert len(page.execute_script("return window.samJax.state.points;")) == 1
    masks, _, _ = predictor.predict(np.array(first["prompt"]["point_coords"]), np.array([1]))
    np.testing.assert_array_equal(canvas_alpha(page), masks[first["selected"]])


def test_exports(page, image_file):
    mask = canvas_alpha(page)
    exported = png_data_url(page.execute_script("return window.samJax.exports.maskPng();"))
    np.testing.assert_array_equal(exported[..., 0] == 255, mask)
    cutout = png_data_url(page.execute_script("return window.samJax.exports.cutoutPng();"))
    np.testing.assert_array_equal(cutout[..., 3] == 255, mask)
    image = np.asarray(Image.open(image_file).convert("RGB"))
    np.testing.assert_array_equal(cutout[mask][:, :3], image[mask])


def test_box_drag(page, predictor):
    page.find_element("id", "clear").click()
    wait_for(page, "!document.getElementById('mask').dataset.predictionId")
    drag(page, (225, 180), (840, 705))
    prediction = wait_for_prediction(page, None)
    body = prediction["prompt"]
    assert "point_coords" not in body and "mask_input" not in body
    np.testing.assert_allclose(body["box"], [225, 180, 840, 705], atol=2)
    masks, iou, _ = predictor.predict(box=np.array(body["box"]))
    check_mask(page, prediction, masks, iou)


def test_hover_previews_the_mask_under_the_cursor(page, predictor):
    from selenium.webdriver import ActionChains

    page.find_element("id", "clear").click()
    page.execute_script("window.samJax.state.hover = null;")
    canvas = page.find_element("id", "prompts")
    ActionChains(page).move_to_element_with_offset(canvas, -40, 30).perform()
    wait_for(page, "window.samJax.state.hover && document.getElementById('mask').classList.contains('preview')",
             what="the hover preview")
    hover = page.execute_script("return window.samJax.state.hover;")
    masks, iou, _ = predictor.predict(np.array(hover["point_coords"]), np.array([1]))
    np.testing.assert_array_equal(canvas_alpha(page), masks[int(np.argmax(iou))])


def test_everything(page, model_and_params, image_file, tmp_path):
    settings = {"points-per-side": 4, "pred-iou-thresh": 0, "stability-score-thresh": 0, "box-nms-thresh": 1}
    for field, value in settings.items():
        box = page.find_element("id", field)
        box.clear()
        box.send_keys(str(value))
    page.find_element("id", "everything").click()
    wait_for(page, "document.body.dataset.state === 'everything'", what="Everything")
    records = page.execute_script("return window.samJax.state.everything.records;")
    generator = SamAutomaticMaskGenerator(*model_and_params, **{k.replace("-", "_"): v for k, v in settings.items()},
                                          output_mode="coco_rle")
    expected = generator.generate(np.asarray(Image.open(image_file).convert("RGB")))
    assert len(records) == len(expected) > 1
    for got, want in zip(records, expected):
        assert got["segmentation"] == want["segmentation"] and got["bbox"] == want["bbox"]
        assert got["point_coords"] == want["point_coords"] and got["crop_box"] == want["crop_box"]
        np.testing.assert_allclose(got["predicted_iou"], want["predicted_iou"], atol=1e-6)
    masks = np.stack([mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
                      for r in expected]).astype(bool)
    np.testing.assert_array_equal(canvas_alpha(page), masks.any(axis=0))
    assert page.execute_script("return JSON.parse(window.samJax.exports.masksJson());") == records

    # a click selects the smallest mask under it
    ys, xs = np.nonzero(masks.any(axis=0))
    x, y = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    click_at(page, x + 0.5, y + 0.5)
    selected = wait_for(page, "document.getElementById('mask').dataset.everythingSelected", what="a selection")
    under = [i for i in range(len(masks)) if masks[i, y, x]]
    assert int(selected) == min(under, key=lambda i: expected[i]["area"])
    path = tmp_path / "serve.png"
    page.save_screenshot(str(path))
    assert Image.open(path).size == tuple(page.execute_script("return [window.innerWidth, window.innerHeight]"))


def test_bad_upload_is_reported_and_the_page_goes_on(page, image_file, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.execute_script("document.body.dataset.state = 'empty';")
    page.find_element("id", "file").send_keys(str(bad))
    wait_for(page, "document.body.dataset.state === 'error'")
    assert "415: notes.png: not an image" in page.find_element("id", "message").text
    # the same image picked from --images: one content, one embedding
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", "folder")).select_by_value(image_file.name)
    wait_for(page, "document.body.dataset.state === 'ready'")
    assert page.execute_script("return window.samJax.state.image.cached;") is True

