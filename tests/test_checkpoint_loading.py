"""Saving and loading converted checkpoints (`sam_jax.weights`): round trips, layouts, strict errors, dtype.

A checkpoint is `sam_jax.json` (config, layout, source) beside an orbax
`params/` directory. Loading must give back exactly what was saved, in
whichever encoder-block layout the caller asks for, or fail with a one-line
`CheckpointError` naming the path and the offending keys; never a partial load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import relative_error
from sam_jax import CheckpointError, Sam, load_sam, save_params, weights
from sam_jax.configs import get_config
from sam_jax.tree_paths import flatten, unflatten
from sam_jax.weights import METADATA_FILE, PARAMS_DIR

SCAN_TOLERANCE = 1e-6

# After a failed restore (the truncated-file case) orbax leaves asyncio tasks
# behind that fail later, in whichever test next uses orbax, with "Event loop
# is closed": orbax's noise, not a result of the test it lands in.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:(?s)Exception ignored.*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


def assert_params_equal(actual: dict, expected: dict, what: str) -> None:
    actual, expected = flatten(actual), flatten(expected)
    assert actual.keys() == expected.keys(), f"{what}: keys differ: {sorted(actual.keys() ^ expected.keys())[:5]}"
    differing = [k for k in expected if not np.array_equal(np.asarray(actual[k]), np.asarray(expected[k]))]
    assert not differing, f"{what}: values differ at {differing[:5]} ({len(differing)} in all)"


def read_metadata(checkpoint: Path) -> dict:
    return json.loads((checkpoint / METADATA_FILE).read_text())


def write_metadata(checkpoint: Path, **changes) -> None:
    (checkpoint / METADATA_FILE).write_text(json.dumps({**read_metadata(checkpoint), **changes}))


def write_raw_params(checkpoint: Path, params: dict) -> None:
    """Replaces the saved params through orbax directly, bypassing `save_params`' checks."""
    shutil.rmtree(checkpoint / PARAMS_DIR)
    ocp.PyTreeCheckpointer().save(checkpoint.absolute() / PARAMS_DIR, jax.tree_util.tree_map(np.asarray, params))


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny params saved once in each layout: {layout: checkpoint directory}."""
    config, _, params = tiny
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        weights.LOOPED: save_params(root / "looped", params, config, source="test"),
        weights.SCANNED: save_params(root / "scanned", weights.to_scanned(params, config), config),
    }


# ----------------------------------------------------------------------------- round trips and layouts


def test_round_trip(tiny, saved):
    config, _, params = tiny
    model, loaded = load_sam(saved["looped"])
    assert model.config == config and not model.scan_blocks
    assert read_metadata(saved["looped"])["source"] == "test"
    assert_params_equal(loaded, params, "loaded vs saved params")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(loaded))


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["load_looped", "load_scanned"])
@pytest.mark.parametrize("saved_layout", weights.LAYOUTS)
def test_layouts(tiny, saved, saved_layout, scan_blocks):
    config, _, params = tiny
    assert read_metadata(saved[saved_layout])["layout"] == saved_layout
    model, loaded = load_sam(saved[saved_layout], scan_blocks=scan_blocks)
    assert model.scan_blocks == scan_blocks
    wanted = weights.SCANNED if scan_blocks else weights.LOOPED
    assert weights.layout_of(loaded) == wanted
    expected = weights.to_layout(params, config, wanted)
    assert_params_equal(loaded, expected, f"saved {saved_layout}, loaded {wanted}")


def test_scanned_model_matches_looped(tiny, saved):
    """Only the encoder differs between the layouts (and the loaded decoder params are
    the same arrays, test_layouts), so the embeddings are what is compared."""
    config, _, _ = tiny
    image = jnp.asarray(np.random.default_rng(0).standard_normal((1, config.image_size, config.image_size, 3),
                                                                 np.float32))

    def embeddings(model, params):
        return jax.jit(lambda p, x: model.apply({"params": p}, x, method=Sam.encode_image))(params, image)

    looped = embeddings(*load_sam(saved["looped"]))
    scanned = embeddings(*load_sam(saved["scanned"], scan_blocks=True))
    error = relative_error(scanned, looped)
    assert error <= SCAN_TOLERANCE, f"scan_blocks=True embeddings: relative error {error:.2e} vs looped"


def test_param_dtype(tiny, saved):
    _, _, params = tiny
    model, loaded = load_sam(saved["looped"], param_dtype=jnp.bfloat16)
    assert model.param_dtype == jnp.bfloat16
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(loaded)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}, dtypes
    expected = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    assert_params_equal(loaded, expected, "bf16 params vs saved params rounded to bf16")


def test_a_failed_read_is_one_error_and_nothing_else(saved, tmp_path):
    """orbax reads arrays concurrently: when one read fails, the others report 'Event loop is
    closed' through sys.unraisablehook (tracebacks on stderr) unless load_params quiets them."""
    import sys
    import time

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(saved["looped"], checkpoint)
    for path in (checkpoint / PARAMS_DIR / "d").iterdir():  # the arrays' data files
        path.unlink()
    reports = []
    previous, sys.unraisablehook = sys.unraisablehook, lambda unraisable: reports.append(unraisable.exc_value)
    try:
        with pytest.raises(CheckpointError, match="cannot restore params"):
            load_sam(checkpoint)
        time.sleep(0.3)  # stragglers come within milliseconds of the failure
    finally:
        sys.unraisablehook = previous
    assert not reports, reports[:3]


def test_save_params_is_strict(tiny, saved, tmp_path):
    config, _, params = tiny
    with pytest.raises(FileExistsError):
        save_params(saved["looped"], params, config)
    bad = {k: v for k, v in flatten(params).items() if k != "mask_decoder/iou_token/embedding"}
    with pytest.raises(CheckpointError, match="params to save: missing mask_decoder/iou_token/embedding"):
        save_params(tmp_path / "bad", unflatten(bad), config)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(CheckpointError, match="params to save: mask_decoder/iou_token/embedding holds 1 NaN"):
        save_params(tmp_path / "bad", _with_value(params, "mask_decoder/iou_token/embedding", _nan_at_first), config)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())


def test_save_params_replaces_only_a_checkpoint(tiny, saved, tmp_path):
    """overwrite=True swaps a checkpoint for a new one (the training export); any other folder stays."""
    config, _, params = tiny
    target = tmp_path / "model"
    save_params(target, params, config, source="first")
    save_params(target, _with_value(params, "image_encoder/pos_embed", lambda x: x + 1), config, source="second",
                overwrite=True)
    assert read_metadata(target)["source"] == "second"
    np.testing.assert_array_equal(flatten(load_sam(target)[1])["image_encoder/pos_embed"],
                                  np.asarray(flatten(params)["image_encoder/pos_embed"]) + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="is not a sam_jax checkpoint; not replacing it"):
        save_params(tmp_path / "mine", params, config, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- errors


def _truncate_largest_params_file(checkpoint: Path) -> None:
    files = [p for p in (checkpoint / PARAMS_DIR).rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def _with_extra_key(params: dict) -> dict:
    return {**params, "image_encoder": {**params["image_encoder"], "extra": np.zeros(3, np.float32)}}


def _without_key(params: dict) -> dict:
    return unflatten({k: v for k, v in flatten(params).items() if k != "mask_decoder/iou_token/embedding"})


def _with_value(params: dict, key: str, value) -> dict:
    flat = flatten(params)
    return unflatten({**flat, key: value(np.asarray(flat[key]))})


def _nan_at_first(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flat[0] = np.nan
    return x


def _replace_all(checkpoint: Path) -> None:
    shutil.rmtree(checkpoint)
    checkpoint.mkdir()


BROKEN: dict[str, tuple[Callable, list[str]]] = {
    # name: (mutation of a good checkpoint copy, given (path, tiny params); what the error must name)
    "missing directory": (lambda ckpt, params: shutil.rmtree(ckpt), ["no such checkpoint directory"]),
    "not a checkpoint": (lambda ckpt, params: _replace_all(ckpt), ["not a converted sam_jax checkpoint",
                                                                    METADATA_FILE]),
    "corrupt metadata": (lambda ckpt, params: (ckpt / METADATA_FILE).write_text('{"format": "sam_'),
                         [METADATA_FILE, "corrupt metadata"]),
    "unknown layout": (lambda ckpt, params: write_metadata(ckpt, layout="diagonal"),
                       [METADATA_FILE, "not sam_jax checkpoint metadata"]),
    "foreign format": (lambda ckpt, params: write_metadata(ckpt, format="other"),
                       [METADATA_FILE, "not sam_jax checkpoint metadata"]),
    "bad config": (lambda ckpt, params: write_metadata(ckpt, config={"name": "vit_tiny"}),
                   [METADATA_FILE, "bad config"]),
    "params deleted": (lambda ckpt, params: shutil.rmtree(ckpt / PARAMS_DIR),
                       [PARAMS_DIR, "cannot restore params"]),
    "params file truncated": (lambda ckpt, params: _truncate_largest_params_file(ckpt),
                              [PARAMS_DIR, "cannot restore params"]),
    "extra key": (lambda ckpt, params: write_raw_params(ckpt, _with_extra_key(params)),
                  ["unexpected image_encoder/extra"]),
    "missing key": (lambda ckpt, params: write_raw_params(ckpt, _without_key(params)),
                    ["missing mask_decoder/iou_token/embedding"]),
    "metadata claims vit_b": (lambda ckpt, params: write_metadata(ckpt, config=get_config("vit_b").to_dict()),
                              ["missing image_encoder/blocks_10/", "misshapen image_encoder/blocks_0/",
                               "(32,) != expected (768,)"]),
    "metadata claims scanned": (lambda ckpt, params: write_metadata(ckpt, layout="scanned"),
                                ["missing image_encoder/block_groups/", "unexpected image_encoder/blocks_0/"]),
    # Values a cast would hide, or that would spread through every prediction.
    "a NaN weight": (lambda ckpt, params: write_raw_params(ckpt, _with_value(
        params, "mask_decoder/iou_token/embedding", _nan_at_first)),
                     ["mask_decoder/iou_token/embedding holds 1 NaN or infinite value"]),
    "an infinite weight": (lambda ckpt, params: write_raw_params(ckpt, _with_value(
        params, "image_encoder/pos_embed", lambda x: np.full_like(x, np.inf))),
                           ["image_encoder/pos_embed holds", "NaN or infinite values"]),
    "an integer weight": (lambda ckpt, params: write_raw_params(ckpt, _with_value(
        params, "image_encoder/neck_1/bias", lambda x: x.astype(np.int32))),
                          ["image_encoder/neck_1/bias is int32, not floating point"]),
    # A config of the right keys with a wrong type: refused when read, not deep inside the model.
    "a string embed_dim": (lambda ckpt, params: write_metadata(ckpt, config={
        **read_metadata(ckpt)["config"], "encoder": {**read_metadata(ckpt)["config"]["encoder"], "embed_dim": "big"}}),
                           [METADATA_FILE, "bad config", "embed_dim must be an integer >= 1; got 'big'"]),
    "a negative depth": (lambda ckpt, params: write_metadata(ckpt, config={
        **read_metadata(ckpt)["config"], "decoder_depth": -2}),
                         [METADATA_FILE, "bad config", "decoder_depth must be an integer >= 1; got -2"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_load_errors(case, tiny, saved, tmp_path):
    _, _, params = tiny
    mutate, names = BROKEN[case]
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(saved["looped"], checkpoint)
    mutate(checkpoint, params)
    with pytest.raises(CheckpointError) as info:
        load_sam(checkpoint)
    message = str(info.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    missing = [name for name in [str(checkpoint), *names] if name not in message]
    assert not missing, f"error message does not name {missing}: {message}"
