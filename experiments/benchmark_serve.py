"""`sam-jax serve` speed: embedding, click-to-mask at the server and in a browser, 4 clients.

    python -m experiments.benchmark_serve                                   # vit_b, random weights
    python -m experiments.benchmark_serve --checkpoint workdir/synthetic_cpu/model \\
        --screenshot experiments/figures/serve.png                          # the main job's model

Starts a real `sam-jax serve` (uvicorn, in a subprocess, on 127.0.0.1) and measures, over HTTP:
  startup       loading the checkpoint and compiling the encoder, until the URL is printed;
  embed         POST /embed of new 768x1024 images: the encoder time the server reports and the
                round trip (upload, decode, encoder, the decoder's warm-up for the image size);
  click         an interactive session's /predict round trips (points added one by one, the
                last mask fed back, cleared every 6 clicks), and the decoder time the server
                reports, p50 and p95;
  clients_4     the same from 4 clients at once, each on its own image;
  browser       click to drawn mask in headless Chromium on the page (body[data-latency-ms]:
                the pointer event to the mask on the canvas), p50 and p95.
With random vit_b weights (no --checkpoint) the same run times the official PyTorch
`SamPredictor` on the same weights and image, in process (no HTTP): `set_image`, and `predict`
for the same clicks, for the ratios. The encoder's FLOP floor uses the fp32 matmul rate measured
in this run. Writes JSON (default workdir/benchmarks/serve_<model>.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.sample_image import synthetic_image
from experiments.serve_browser import LiveServer, click_at, open_image, start_browser, wait_for_prediction
from sam_jax.host import cpu_model, matmul_rate

IMAGE_SIZE = (768, 1024)  # (H, W)
CLEAR_EVERY = 6  # clicks per object in the interactive session


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    at = lambda q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]
    return {"p50": statistics.median(values), "p95": at(0.95), "n": len(values)}


def session_clicks(rng: np.random.Generator, n: int) -> list[tuple[float, float, int]]:
    """(x, y, label) clicks: a foreground point, then corrections (a third of them background)."""
    h, w = IMAGE_SIZE
    return [(float(rng.uniform(0, w)), float(rng.uniform(0, h)), 1 if i % CLEAR_EVERY == 0 or rng.random() > 1 / 3 else 0)
            for i in range(n)]


def click_session(client, url: str, image_id: str, clicks) -> tuple[list[float], list[float], list[dict]]:
    """Round-trip and server decoder milliseconds of each click, and the prompts sent."""
    round_trips, decoder, prompts = [], [], []
    points, previous = [], None
    for i, (x, y, label) in enumerate(clicks):
        if i % CLEAR_EVERY == 0:
            points, previous = [], None
        points.append((x, y, label))
        body = {"image_id": image_id, "point_coords": [[p[0], p[1]] for p in points],
                "point_labels": [p[2] for p in points], "multimask_output": True}
        if previous is not None:
            body["mask_input"] = previous
        start = time.perf_counter()
        response = client.post(f"{url}predict", json=body)
        round_trips.append(1000 * (time.perf_counter() - start))
        response.raise_for_status()
        result = response.json()
        decoder.append(result["decode_ms"])
        best = max(range(len(result["masks"])), key=lambda k: result["masks"][k]["predicted_iou"])
        previous = {"prediction_id": result["prediction_id"], "index": best}
        prompts.append({**body, "selected": best})
    return round_trips, decoder, prompts


def embed(client, url: str, data: bytes, name: str) -> tuple[dict, float]:
    start = time.perf_counter()
    response = client.post(f"{url}embed", files={"file": (name, data, "image/png")}, timeout=600)
    response.raise_for_status()
    return response.json(), 1000 * (time.perf_counter() - start)


def wait_decoder_warm(client, url: str, timeout: float = 900) -> float:
    start = time.monotonic()
    while not client.get(f"{url}api/info").json()["decoder_warm"]:
        if time.monotonic() - start > timeout:
            raise TimeoutError("the server's decoder warm-up did not finish")
        time.sleep(0.2)
    return time.monotonic() - start


def bench_server(result: dict, url: str, clicks: int, clients: int, rng) -> list[dict]:
    import httpx

    with httpx.Client(timeout=600) as client:
        images = [synthetic_image(*IMAGE_SIZE, seed=100 + i) for i in range(clients + 1)]
        embeds = [embed(client, url, png(image), f"bench{i}.png") for i, image in enumerate(images)]
        result["embed"] = {
            "encoder_ms": percentiles([1000 * e["encode_seconds"] for e, _ in embeds]),
            "round_trip_ms": percentiles([ms for _, ms in embeds]),
            "cached_round_trip_ms": embed(client, url, png(images[0]), "again.png")[1],
        }
        round_trips, decoder, prompts = click_session(client, url, embeds[0][0]["image_id"],
                                                      session_clicks(rng, clicks))
        result["click"] = {"round_trip_ms": percentiles(round_trips), "decoder_ms": percentiles(decoder)}

    outcomes = [None] * clients

    def one_client(i):
        with httpx.Client(timeout=600) as c:
            outcomes[i] = click_session(c, url, embeds[i + 1][0]["image_id"], session_clicks(
                np.random.default_rng(i), clicks))

    start = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    result[f"clients_{clients}"] = {
        "round_trip_ms": percentiles([ms for o in outcomes for ms in o[0]]),
        "decoder_ms": percentiles([ms for o in outcomes for ms in o[1]]),
        "clicks_per_second": clients * clicks / wall,
    }
    result["images"] = images[0]
    return prompts


def bench_browser(result: dict, url: str, clicks: int, rng, image_path: Path,
                  screenshot: Path | None, screenshot_click) -> None:
    profile = tempfile.TemporaryDirectory()
    driver = start_browser(Path(profile.name))
    try:
        driver.get(url)
        open_image(driver, image_path)
        h, w = np.asarray(Image.open(image_path)).shape[:2]
        latencies, previous = [], None
        for i in range(clicks):
            if i % CLEAR_EVERY == 0:
                driver.find_element("id", "clear").click()
                previous = None
            click_at(driver, rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h, background=i % 3 == 2)
            previous = wait_for_prediction(driver, previous and previous["prediction_id"])
            latencies.append(float(driver.execute_script("return document.body.dataset.latencyMs")))
        result["browser"] = {"click_to_mask_ms": percentiles(latencies), "image": f"{w}x{h}",
                             "browser": driver.capabilities.get("browserVersion")}
        if screenshot is not None:
            driver.find_element("id", "clear").click()
            for x, y, background in screenshot_click:
                previous = driver.execute_script("return window.samJax.state.prediction;")
                click_at(driver, x, y, background=background)
                wait_for_prediction(driver, previous and previous["prediction_id"])
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
        profile.cleanup()


def bench_official(result: dict, reference, image: np.ndarray, prompts: list[dict], repeats: int = 3) -> None:
    """The official SamPredictor in process: set_image, and predict for the same clicks."""
    import torch

    from experiments.benchmark_inference import official_module

    predictor = official_module("predictor").SamPredictor(reference)
    with torch.inference_mode():
        predictor.set_image(image)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predictor.set_image(image)
            times.append(1000 * (time.perf_counter() - start))
        click_ms, logits = [], {}
        for i, body in enumerate(prompts):
            mask_input = None
            if "mask_input" in body:
                mask_input = logits[i - 1][prompts[i - 1]["selected"]][None]
            start = time.perf_counter()
            _, _, low_res = predictor.predict(np.array(body["point_coords"]), np.array(body["point_labels"]),
                                              mask_input=mask_input, multimask_output=True)
            click_ms.append(1000 * (time.perf_counter() - start))
            logits[i] = low_res
    result["official"] = {"set_image_ms": percentiles(times), "predict_ms": percentiles(click_ms)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a sam_jax checkpoint (default: random vit_b weights)")
    parser.add_argument("--clicks", type=int, default=30, help="clicks per session (default 30)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--browser-clicks", type=int, default=12)
    parser.add_argument("--screenshot", type=Path, help="save a screenshot of the page here")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    work = tempfile.TemporaryDirectory()
    reference = None
    if args.checkpoint is None:
        import torch

        from checkpoints_convert import reference_model
        from checkpoints_convert.official import official_to_flax
        from sam_jax.configs import CONFIGS
        from sam_jax.weights import save_params

        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        config = CONFIGS["vit_b"]
        reference = reference_model.build_official_for(config).eval()
        params = official_to_flax(reference_model.state_dict_numpy(reference), config)
        checkpoint = save_params(Path(work.name) / "vit_b", params, config, source="random official layout")
        name, weights = "vit_b", "random (official layout, seed 0)"
    else:
        from sam_jax.weights import read_metadata

        checkpoint = args.checkpoint
        name, weights = read_metadata(checkpoint)["config"]["name"], str(checkpoint)

    result = {"model_type": name, "weights": weights, "cpu": cpu_model(), "threads": os.cpu_count(),
              "matmul_gflops_per_s": matmul_rate() / 1e9, "image": f"{IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}"}
    output = args.output or Path("workdir/benchmarks") / f"serve_{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    server = LiveServer(checkpoint)
    result["startup_seconds"] = time.perf_counter() - start
    try:
        run(args, result, reference, server.url, rng, output)
    finally:
        server.stop()
    print(json.dumps(result, indent=2))
    print(f"wrote {output}")
    work.cleanup()
    return result


def run(args, result: dict, reference, url: str, rng, output: Path) -> None:
    import httpx

    with httpx.Client() as client:
        result["decoder_warm_up_seconds_after_startup"] = wait_decoder_warm(client, url)
    prompts = bench_server(result, url, args.clicks, args.clients, rng)
    image = result.pop("images")
    if reference is not None:
        from experiments.benchmark_inference import encoder_flops
        from sam_jax.configs import CONFIGS

        bench_official(result, reference, image, prompts)
        result["ratios"] = {
            "encoder_vs_official_set_image": result["embed"]["encoder_ms"]["p50"] / result["official"]["set_image_ms"]["p50"],
            "click_round_trip_vs_official_predict": result["click"]["round_trip_ms"]["p50"] / result["official"]["predict_ms"]["p50"],
            "encoder_vs_flop_floor": result["embed"]["encoder_ms"]["p50"] / 1000 / (
                encoder_flops(CONFIGS[result['model_type']], 1) / (result["matmul_gflops_per_s"] * 1e9)),
        }
    output.write_text(json.dumps(result, indent=2) + "\n")

    image_path = output.parent / f"serve_browser_{result['model_type']}.png"
    screenshot_clicks = ()
    if args.checkpoint is not None and (Path(args.checkpoint).parent / "samples").is_dir():
        # the main job's held-out samples: a real object to click on
        sample = sorted((Path(args.checkpoint).parent / "samples").iterdir())[0]
        image_path.write_bytes(sample.read_bytes())
        prompts_file = Path(args.checkpoint).parent / "sample_prompts.json"
        if prompts_file.is_file():
            first = json.loads(prompts_file.read_text()).get(sample.name, {})
            screenshot_clicks = [(x, y, False) for x, y in first.get("point_coords", [])[:1]]
    else:
        image_path.write_bytes(png(image))
    bench_browser(result, url, args.browser_clicks, rng, image_path, args.screenshot,
                  screenshot_clicks or [(0.4 * IMAGE_SIZE[1], 0.5 * IMAGE_SIZE[0], False)])
    result["matmul_gflops_per_s_after"] = matmul_rate() / 1e9
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
