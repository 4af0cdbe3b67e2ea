"""`sam-jax export --format stablehlo`: the artifacts reloaded in a fresh process that imports jax
but never sam_jax give sam_jax's encoder and decoder outputs, for several batch and point counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_output

from sam_jax.export import MANIFEST, export_model
from sam_jax.modeling import Sam, inference
from sam_jax.utils.transforms import ResizeLongestSide, pad_to_square

# Runs in a fresh interpreter: jax, numpy and json only. Reads inputs.npz, writes outputs.npz.
RELOAD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    folder, inputs, outputs = sys.argv[1:]
    manifest = json.load(open(f"{folder}/export.json"))
    x = dict(np.load(inputs))
    results = {}
    for part in ("encoder", "decoder"):
        exported = jax.export.deserialize(open(f"{folder}/{part}.jax_export", "rb").read())
        weights = dict(np.load(f"{folder}/{part}_weights.npz"))
        names = [i["name"] for i in manifest["parts"][part]["inputs"]]
        for case in sorted({k.split(":")[0] for k in x if k.startswith(part)}):
            out = exported.call(weights, *[x[f"{case}:{name}"] for name in names])
            for name, value in zip([o["name"] for o in manifest["parts"][part]["outputs"]], out):
                results[f"{case}:{name}"] = np.asarray(value)
    np.savez(outputs, **results)
    assert not any(m == "sam_jax" or m.startswith("sam_jax.") for m in sys.modules), "sam_jax was imported"
    print("platforms", exported.platforms)
""")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    cfg, _, params = tiny
    return export_model(Sam(cfg), params, tmp_path_factory.mktemp("stablehlo") / "export", "stablehlo")


def decoder_inputs(cfg, rng, prompts: int, points: int) -> dict:
    """B prompts of N points each, the last of each the official (0, 0, -1) pad point; half with a mask."""
    e, m = cfg.embedding_size, cfg.low_res_mask_size
    coords = rng.uniform(0, cfg.image_size, (prompts, points, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (prompts, points)).astype(np.float32)
    coords[:, -1], labels[:, -1] = 0.0, -1.0
    return {"image_embeddings": rng.normal(size=(1, cfg.prompt_embed_dim, e, e)).astype(np.float32),
            "point_coords": coords, "point_labels": labels,
            "mask_input": rng.normal(0, 4, (prompts, 1, m, m)).astype(np.float32),
            "has_mask_input": (np.arange(prompts) % 2).astype(np.float32)}


def test_reloaded_without_sam_jax_equals_sam_jax(tiny, exported, tmp_path):
    cfg, _, params = tiny
    model = Sam(cfg)
    rng = np.random.default_rng(0)
    transform = ResizeLongestSide(cfg.image_size)
    inputs, want = {}, {}
    for batch in (1, 3):
        images = [transform.apply_image(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
                  for h, w in rng.integers(100, 700, (batch, 2))]
        padded, sizes = pad_to_square(images, cfg.image_size, batch)
        inputs[f"encoder{batch}:images"], inputs[f"encoder{batch}:input_sizes"] = padded.astype(np.float32), sizes
        embeddings = inference.encode_images(model, params, jnp.asarray(padded), jnp.asarray(sizes))
        want[f"encoder{batch}:image_embeddings"] = np.transpose(np.asarray(embeddings), (0, 3, 1, 2))
    for prompts, points in ((1, 2), (4, 3), (2, 9)):
        case = f"decoder{prompts}x{points}"
        x = decoder_inputs(cfg, rng, prompts, points)
        inputs.update({f"{case}:{k}": v for k, v in x.items()})
        # sam_jax's own decoder path (`Sam.decode`, multimask): it adds the pad point itself.
        embedding = jnp.asarray(np.transpose(x["image_embeddings"], (0, 2, 3, 1)))
        for i in range(prompts):
            mask = jnp.asarray(x["mask_input"][i : i + 1]) if x["has_mask_input"][i] else None
            low, iou = inference.decode_low_res(model, params, embedding, jnp.asarray(x["point_coords"][i : i + 1, :-1]),
                                                jnp.asarray(x["point_labels"][i : i + 1, :-1], jnp.int32), None, mask,
                                                True)
            want.setdefault(f"{case}:low_res_masks", []).append(np.asarray(low)[0])
            want.setdefault(f"{case}:iou_predictions", []).append(np.asarray(iou)[0])
    np.savez(tmp_path / "inputs.npz", **inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", RELOAD, str(exported), str(tmp_path / "inputs.npz"),
                          str(tmp_path / "outputs.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "'cpu', 'cuda', 'tpu'" in run.stdout
    got = dict(np.load(tmp_path / "outputs.npz"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        value = np.stack(value) if isinstance(value, list) else value
        result = got[key][:, 1:] if key.startswith("decoder") else got[key]  # tokens 1..3: multimask
        assert result.shape == value.shape, key
        check_output(f"stablehlo reloaded {key}", result, value)


def test_manifest_records_the_calling_convention(exported):
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["kind"] == "stablehlo"
    decoder, encoder = manifest["parts"]["decoder"], manifest["parts"]["encoder"]
    assert [i["shape"] for i in decoder["inputs"]] == [[1, 32, 16, 16], ["prompts", "num_points", 2],
                                                       ["prompts", "num_points"], ["prompts", 1, 64, 64],
                                                       ["prompts"]]
    assert decoder["outputs"][0] == {"name": "low_res_masks", "shape": ["prompts", 4, 64, 64], "dtype": "float32"}
    assert encoder["inputs"][1] == {"name": "input_sizes", "shape": ["batch", 2], "dtype": "int32"}
    assert encoder["platforms"] == ["cpu", "cuda", "tpu"] and encoder["jax_version"]
    weights = np.load(exported / "encoder_weights.npz")
    assert encoder["weights"]["count"] == len(weights.files)
    assert all(k.startswith("image_encoder/") for k in weights.files)
    # The portable artifact is MLIR bytecode.
    assert (exported / "decoder.mlirbc").read_bytes()[:4] == b"ML\xefR"
