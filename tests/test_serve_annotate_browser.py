"""`sam-jax serve --annotate` in a real browser: headless Chromium (through selenium, as
tests/test_serve_browser.py drives it) on a uvicorn server on 127.0.0.1 serving the annotation
app with the tiny model. A click's mask, a proposal, a fixed and a rejected proposal are accepted
with the keyboard; what lands in the SA-1B files is what the page drew; a restarted server
resumes at the first image not done. The tests run in order on one page."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from experiments.sample_image import synthetic_image
from experiments.serve_browser import canvas_alpha, click_at, wait_for, wait_for_prediction
from sam_jax.cli.serve import listen
from sam_jax.data import rle, sa1b_writer
from sam_jax.serve.annotations import AnnotationStore
from sam_jax.serve.api import create_app
from sam_jax.modeling import Sam
from sam_jax.serve.service import SegmentationService
from test_serve_browser import browser_on

HEIGHT, WIDTH = 450, 600
PROPOSALS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


class AnnotateServer:
    """What `sam-jax serve --images IMAGES --annotate` serves, from a thread: a fresh service and
    store (read back from the annotations folder), uvicorn on a free port of 127.0.0.1."""

    def __init__(self, tiny, images, annotations) -> None:
        import uvicorn

        config, _, params = tiny
        service = SegmentationService(Sam(config), params, images_folder=str(images))
        app = create_app(service, AnnotationStore(service, annotations, PROPOSALS))
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(images: a.jpg and b.jpg, RGB JPEGs; the annotations folder)."""
    images = tmp_path_factory.mktemp("annotate") / "images"
    images.mkdir()
    for seed, name in enumerate(("a.jpg", "b.jpg")):
        Image.fromarray(synthetic_image(HEIGHT, WIDTH, seed=seed + 3)).save(images / name, quality=95)
    return images, images / "annotations"


@pytest.fixture(scope="module")
def server(tiny, folders):
    live = AnnotateServer(tiny, *folders)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    yield from browser_on(server.url, tmp_path_factory.mktemp("chromium-profile"))


def press(page, key: str) -> None:
    from selenium.webdriver import ActionChains

    ActionChains(page).send_keys(key).perform()


def saved(folders, stem: str) -> list[dict]:
    return sa1b_writer.read_record(folders[1] / sa1b_writer.json_name(stem))["annotations"]


def decoded(record: dict) -> np.ndarray:
    return rle.decode(record["segmentation"]["counts"], record["segmentation"]["size"])


def wait_for_saved(page, count: int) -> None:
    wait_for(page, f"document.getElementById('accepted').dataset.count === '{count}' && "
                   "!window.samJax.state.annotate.busy", what=f"{count} accepted masks")


def test_opens_the_first_image_with_its_proposals(page):
    wait_for(page, "document.body.dataset.annotateImage === 'a.jpg'", what="a.jpg")
    assert page.find_element("id", "image-counter").text == "image 1 of 2 · a.jpg"
    assert page.find_element("id", "annotate-totals").text == "0 masks saved · 0 of 2 images done"
    assert not page.find_element("id", "file").is_displayed() and not page.find_element("id", "everything").is_displayed()
    count = int(wait_for(page, "Number(document.getElementById('outlines').dataset.count)", what="proposals"))
    assert count >= 3 and len(page.find_elements("css selector", "#proposal-list li.open")) == count


def test_click_then_enter_saves_the_mask_drawn(page, folders):
    click_at(page, 300, 220)
    prediction = wait_for_prediction(page, None)
    drawn = canvas_alpha(page)
    press(page, "\ue007")  # Enter
    wait_for_saved(page, 1)
    (annotation,) = saved(folders, "a")
    np.testing.assert_array_equal(decoded(annotation), drawn)
    np.testing.assert_array_equal(canvas_alpha(page, "accepted"), drawn)
    assert annotation["source"] == "manual" and annotation["point_labels"] == [1]
    assert annotation["point_coords"] == prediction["prompt"]["point_coords"]
    assert not canvas_alpha(page).any()  # the prompt is cleared for the next object
    assert page.find_element("id", "annotate-totals").text.startswith("1 masks saved")


def test_a_proposal_accepted_with_the_keyboard(page, folders):
    press(page, "]")
    key = wait_for(page, "document.getElementById('mask').dataset.proposal", what="a selected proposal")
    proposal = page.execute_script(f"return window.samJax.state.annotate.proposals.find((p) => p.key === '{key}');")
    np.testing.assert_array_equal(canvas_alpha(page), decoded(proposal))
    press(page, "\ue007")
    wait_for_saved(page, 2)
    annotation = saved(folders, "a")[1]
    assert (annotation["source"], annotation["proposal"]) == ("proposal", key)
    assert annotation["segmentation"] == proposal["segmentation"]
    assert "accepted" in page.find_element("css selector", f"#proposal-list li[data-key='{key}']").get_attribute("class")
    # the next open proposal is selected
    assert wait_for(page, "document.getElementById('mask').dataset.proposal") != key


def test_reject_then_fix_a_proposal(page, folders):
    rejected = page.execute_script("return document.getElementById('mask').dataset.proposal;")
    press(page, "r")
    wait_for(page, f"window.samJax.state.annotate.image.proposal_marks['{rejected}'] === 'rejected'")
    key = wait_for(page, f"document.getElementById('mask').dataset.proposal !== '{rejected}' && "
                         "document.getElementById('mask').dataset.proposal", what="the next proposal")
    press(page, "f")
    prediction = wait_for_prediction(page, None)
    point = page.execute_script(f"return window.samJax.state.annotate.proposals.find((p) => p.key === '{key}')"
                                ".point_coords[0];")
    assert prediction["prompt"]["point_coords"] == [point]
    click_at(page, 30, 30, background=True)
    refined = wait_for_prediction(page, prediction["prediction_id"])
    assert refined["prompt"]["mask_input"]["prediction_id"] == prediction["prediction_id"]
    drawn = canvas_alpha(page)
    press(page, "\ue007")
    wait_for_saved(page, 3)
    annotation = saved(folders, "a")[2]
    assert (annotation["source"], annotation["proposal"], annotation["point_labels"]) == ("proposal_fixed", key, [1, 0])
    np.testing.assert_array_equal(decoded(annotation), drawn)


def test_delete_an_accepted_mask(page, folders):
    page.find_element("css selector", "#accepted-list li[data-id='1'] button").click()
    wait_for_saved(page, 2)
    annotations = saved(folders, "a")
    assert [a["id"] for a in annotations] == [2, 3]
    np.testing.assert_array_equal(canvas_alpha(page, "accepted"), decoded(annotations[0]) | decoded(annotations[1]))


def test_done_opens_the_next_image(page):
    press(page, "d")
    wait_for(page, "document.body.dataset.annotateImage === 'b.jpg'", what="b.jpg")
    assert page.find_element("id", "image-counter").text == "image 2 of 2 · b.jpg"
    assert page.find_element("id", "annotate-totals").text == "2 masks saved · 1 of 2 images done"
    assert not canvas_alpha(page, "accepted").any()


def test_a_restarted_server_resumes(page, server, tiny, folders):
    server.stop()
    again = AnnotateServer(tiny, *folders)
    try:
        page.get(again.url)
        wait_for(page, "document.body.dataset.annotateImage === 'b.jpg'", what="the first image not done")
        assert page.find_element("id", "annotate-totals").text == "2 masks saved · 1 of 2 images done"
        press(page, "p")
        wait_for(page, "document.body.dataset.annotateImage === 'a.jpg'", what="a.jpg")
        assert page.find_element("id", "image-counter").text == "image 1 of 2 · a.jpg · ✓ done"
        annotations = saved(folders, "a")
        np.testing.assert_array_equal(canvas_alpha(page, "accepted"),
                                      decoded(annotations[0]) | decoded(annotations[1]))
        wait_for(page, "window.samJax.state.annotate.proposals.length > 0", what="proposals")
        marks = {li.get_attribute("data-key"): li.get_attribute("class").split()
                 for li in page.find_elements("css selector", "#proposal-list li")}
        assert "accepted" in marks[annotations[0]["proposal"]] and "fixed" in marks[annotations[1]["proposal"]]
        assert sum("rejected" in classes for classes in marks.values()) == 1
    finally:
        again.stop()
