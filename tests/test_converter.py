"""The converter (`checkpoints_convert.convert`): official and Hugging Face weights -> sam_jax checkpoints.

* End to end: a random official vit_tiny `.pth` through the CLI, loaded with
  `load_sam`, runs like the torch model; once as `python -m` in a subprocess.
* The model type is read off the shapes; `--model-type` only checks it.
* Strictness: missing, extra, misshapen tensors and other models' weights are
  refused with one-line errors naming the keys; unreadable sources too. A
  failed conversion leaves nothing behind (convert writes a staging dir
  beside the output and renames it), and an existing output is never touched.
* The key mapping of the full-size vit_b/l/h layouts, without forward passes
  (official models built on torch's meta device, constant numpy tensors).
* Hugging Face `SamModel` weights (safetensors, `pytorch_model.bin`,
  `save_pretrained`) convert to the same params, and a converted vit_b runs
  like HF's model (image embeddings, mask logits and IoU for points, boxes,
  both, with and without multimask output).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from checkpoints_convert import reference_model
from checkpoints_convert.convert import convert_checkpoint, main
from checkpoints_convert.official import detect_config, flax_to_official, official_to_flax
from conftest import relative_error, report
from sam_jax import CheckpointError, Sam, load_sam, weights
from sam_jax.configs import SamConfig, get_config
from sam_jax.tree_paths import flatten
from sam_jax.weights import METADATA_FILE, abstract_params, check_params_match
from test_huggingface_mapping import randomise_hf

REPO = Path(__file__).resolve().parents[1]
EMBEDDING_TOLERANCE = 1e-5
DECODER_TOLERANCE = 1e-4
PE_KEY = "shared_image_embedding.positional_embedding"
PE_TWIN = "prompt_encoder.shared_embedding.positional_embedding"  # HF's tied copy of PE_KEY


# ----------------------------------------------------------------------------- helpers


def save_pth(state_dict: dict, path: Path) -> Path:
    torch.save({key: torch.as_tensor(value) for key, value in state_dict.items()}, path)
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    """Runs the CLI in-process: (exit code, stdout, stderr)."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def metadata(checkpoint: Path) -> dict:
    return json.loads((checkpoint / METADATA_FILE).read_text())


def assert_params_equal(actual: dict, expected: dict, what: str) -> None:
    actual, expected = flatten(actual), flatten(expected)
    assert actual.keys() == expected.keys(), f"{what}: keys differ: {sorted(actual.keys() ^ expected.keys())[:5]}"
    differing = [k for k in expected if not np.array_equal(np.asarray(actual[k]), np.asarray(expected[k]))]
    assert not differing, f"{what}: values differ at {differing[:5]} ({len(differing)} in all)"


def make_prompts(kind: str, image_size: int, seed: int = 4) -> dict[str, np.ndarray | None]:
    """Two prompts on one image: 3 points each, and/or one box each (encoder-input pixels)."""
    rng = np.random.default_rng(seed)
    with_points, with_box = "points" in kind, "box" in kind
    return dict(
        point_coords=(rng.random((2, 3, 2)) * image_size).astype(np.float32) if with_points else None,
        point_labels=np.array([[1, 0, 1], [0, 1, -1]], np.int32) if with_points else None,
        boxes=(np.array([[10, 20, 200, 180], [50, 60, 120, 250]], np.float32) * image_size / 256)
        if with_box else None,
    )


def random_image(config: SamConfig, seed: int = 3) -> np.ndarray:
    """A normalised, padded input image, NCHW as torch takes it."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, 3, config.image_size, config.image_size), dtype=np.float32)


def _torch(array, dtype=None):
    return None if array is None else torch.as_tensor(array, dtype=dtype)


class JaxSam:
    """A loaded sam_jax checkpoint with its encoder jitted once, and its decoder.

    The decoder is jitted too unless `jit_decode=False`: tests that decode
    many prompt kinds run it eagerly, as each jit compile costs ~2 s on CPU
    (one per prompt kind and multimask flag) and an eager decode ~0.2 s.
    """

    def __init__(self, checkpoint: Path, jit_decode: bool = True):
        self.model, self.params = load_sam(checkpoint)
        self._encode = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=Sam.encode_image))

        def decode(params, embeddings, prompts, multimask):
            return self.model.apply({"params": params}, embeddings, **prompts, multimask_output=multimask,
                                    method=Sam.decode)

        self._decode = jax.jit(decode, static_argnums=3) if jit_decode else decode

    def encode(self, image_nchw: np.ndarray) -> jax.Array:
        """(1, h, w, D) channels-last embeddings."""
        return self._encode(self.params, jnp.asarray(image_nchw.transpose(0, 2, 3, 1)))

    def decode(self, embeddings: jax.Array, prompts: dict, multimask: bool):
        given = {k: jnp.asarray(v) for k, v in prompts.items() if v is not None}
        return self._decode(self.params, embeddings, given, multimask)


@torch.no_grad()
def official_forward(model, image_nchw: np.ndarray, prompts: dict, multimask: bool):
    """(embeddings NCHW, low-res logits, IoU) of the official model, as `SamPredictor.predict_torch` runs it."""
    embeddings = model.image_encoder(torch.from_numpy(image_nchw))
    points = None
    if prompts["point_coords"] is not None:
        points = (_torch(prompts["point_coords"]), _torch(prompts["point_labels"], torch.int64))
    sparse, dense = model.prompt_encoder(points=points, boxes=_torch(prompts["boxes"]), masks=None)
    logits, iou = model.mask_decoder(
        image_embeddings=embeddings, image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)
    return embeddings, logits, iou


def assert_close(name: str, actual, expected, tolerance: float) -> None:
    error = relative_error(actual, expected)
    report(name, error)
    assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


def assert_fails(capsys, source, output: Path, *names: str) -> str:
    """Conversion of `source` to `output` fails cleanly: CheckpointError and exit code 2,
    a one-line message naming each of `names`, and `output`'s parent as it was."""
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    before = sorted(parent.iterdir())
    existed = output.exists()
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint(source, output)
    message = str(info.value)
    code, stdout, stderr = cli(capsys, source, output)
    assert code == 2, f"exit code {code}; stderr: {stderr}"
    assert stdout == "" and stderr == f"error: {message}\n", (stdout, stderr)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    missing = [name for name in names if name not in message]
    assert not missing, f"error message does not name {missing}: {message}"
    assert output.exists() == existed, f"{output} was created or removed by a failed conversion"
    assert sorted(parent.iterdir()) == before, f"leftovers in {parent}: {sorted(parent.iterdir())}"
    return message


# ----------------------------------------------------------------------------- official vit_tiny


@pytest.fixture(scope="module")
def tiny_state(tiny) -> dict[str, torch.Tensor]:
    _, model, _ = tiny
    return dict(model.state_dict())


@pytest.fixture(scope="module")
def tiny_pth(tiny_state, tmp_path_factory) -> Path:
    return save_pth(tiny_state, tmp_path_factory.mktemp("official") / "sam_vit_tiny.pth")


def test_cli_end_to_end_matches_official(tiny, tiny_pth, tmp_path, capsys):
    config, model, params = tiny
    out = tmp_path / "converted" / "vit_tiny"  # parent created by the converter
    code, stdout, stderr = cli(capsys, tiny_pth, out)
    assert code == 0, stderr
    assert f"({config.name}, looped) -> {out}" in stdout, stdout

    jax_sam = JaxSam(out)
    assert_params_equal(jax_sam.params, params, "loaded vs directly converted params")
    image, prompts = random_image(config), make_prompts("points", config.image_size)
    embeddings, logits, iou = official_forward(model, image, prompts, multimask=True)
    ours = jax_sam.encode(image)
    our_logits, our_iou = jax_sam.decode(ours, prompts, multimask=True)
    assert_close("cli vit_tiny embeddings", np.asarray(ours).transpose(0, 3, 1, 2), embeddings,
                 EMBEDDING_TOLERANCE)
    assert_close("cli vit_tiny low-res logits", our_logits, logits, DECODER_TOLERANCE)
    assert_close("cli vit_tiny iou", our_iou, iou, DECODER_TOLERANCE)


def test_python_dash_m(tiny_pth, tmp_path):
    out = tmp_path / "vit_tiny"
    result = subprocess.run([sys.executable, "-m", "checkpoints_convert.convert", str(tiny_pth), str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert re.fullmatch(rf"converted {re.escape(str(tiny_pth))} \(vit_tiny, looped\) -> "
                        rf"{re.escape(str(out))} in \d+\.\d s", line), line
    assert metadata(out)["config"]["name"] == "vit_tiny"


def test_detected_type_is_recorded(tiny_pth, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, stdout, stderr = cli(capsys, tiny_pth, out, "--model-type", "vit_tiny")  # agreeing check passes
    assert code == 0, stderr
    meta = metadata(out)
    assert SamConfig.from_dict(meta["config"]) == get_config("vit_tiny"), meta["config"]
    assert meta["layout"] == "looped" and meta["source"] == f"official:{tiny_pth.name}", meta


def test_scanned_layout_option(tiny, tiny_pth, tmp_path, capsys):
    config, _, params = tiny
    out = tmp_path / "scanned"
    code, stdout, stderr = cli(capsys, tiny_pth, out, "--layout", "scanned")
    assert code == 0 and "(vit_tiny, scanned)" in stdout, (stdout, stderr)
    assert metadata(out)["layout"] == "scanned"
    _, looped = load_sam(out)  # scan_blocks=False: back to the looped layout
    assert_params_equal(looped, params, "scanned checkpoint loaded looped")


def test_wrong_model_type(tiny_pth, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, stdout, stderr = cli(capsys, tiny_pth, out, "--model-type", "vit_b")
    assert code == 2, stdout
    assert len(stderr.splitlines()) == 1 and "vit_tiny" in stderr and "vit_b" in stderr, stderr
    assert not out.exists()
    assert sorted(tmp_path.iterdir()) == [], sorted(tmp_path.iterdir())


def test_half_precision_checkpoint(tiny_state, tmp_path, capsys):
    half = {key: value.half() for key, value in tiny_state.items()}
    out = tmp_path / "ckpt"
    code, _, stderr = cli(capsys, save_pth(half, tmp_path / "half.pth"), out)
    assert code == 0, stderr
    _, params = load_sam(out)
    expected = official_to_flax({k: v.float().numpy() for k, v in half.items()}, get_config("vit_tiny"))
    assert_params_equal(params, expected, "fp16 checkpoint, converted to fp32")


# ----------------------------------------------------------------------------- strictness


def _without(state: dict, *keys: str) -> dict:
    return {k: v for k, v in state.items() if k not in keys}


def _resnet_like() -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {"conv1.weight": (8, 3, 7, 7), "bn1.weight": (8,), "bn1.bias": (8,), "bn1.running_mean": (8,),
              "layer1.0.conv1.weight": (8, 8, 3, 3), "layer1.0.bn1.weight": (8,), "fc.weight": (10, 8),
              "fc.bias": (10,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _unknown_size() -> dict:
    """A well-formed official SAM with a ViT width no registered config has."""
    torch.manual_seed(0)
    model = reference_model.build_official_sam(48, 4, 2, (1, 3), image_size=256, prompt_embed_dim=32,
                                            decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
    return model.state_dict()


QKV = "image_encoder.blocks.0.attn.qkv.weight"
PATCH = "image_encoder.patch_embed.proj.weight"
POS = "image_encoder.pos_embed"
BAD_STATE_DICTS = {
    # name: (tiny state dict -> bad state dict, what the error must name)
    "missing key": (lambda sd: _without(sd, "mask_decoder.iou_token.weight"),
                    ["missing", "mask_decoder.iou_token.weight", "vit_tiny"]),
    "many missing keys": (lambda sd: {k: v for k, v in sd.items() if not k.startswith("mask_decoder.")},
                          ["missing", "mask_decoder.iou_token.weight", "... (", " in all)"]),
    "extra key": (lambda sd: {**sd, "mask_decoder.extra_head.weight": torch.zeros(3)},
                  ["unexpected", "mask_decoder.extra_head.weight"]),
    "misshapen tensor": (lambda sd: {**sd, QKV: sd[QKV].t()}, [QKV, "(32, 96)", "(96, 32)"]),
    # Tensors the model type is read from: misshapen, they must not crash or mislead detection.
    "2-D patch embedding": (lambda sd: {**sd, PATCH: sd[PATCH].reshape(32, -1)}, [PATCH, "(32, 768)"]),
    "2-D pos_embed": (lambda sd: {**sd, POS: sd[POS][0, 0]}, [POS, "(16, 32)"]),
    "linear layer": (lambda sd: torch.nn.Linear(4, 3).state_dict(),
                     ["not a SAM checkpoint", "image_encoder.patch_embed.proj.weight"]),
    "resnet-like": (lambda sd: _resnet_like(), ["not a SAM checkpoint"]),
    "unknown SAM size": (lambda sd: _unknown_size(), ["matches no known model type", "embed_dim=48"]),
    # Values that a float32 cast would hide or the model would spread: refused, naming the tensor.
    "a NaN weight": (lambda sd: {**sd, QKV: sd[QKV].index_fill(0, torch.tensor([3]), float("nan"))},
                     [QKV, "holds 32 NaN or infinite values"]),
    "an integer weight": (lambda sd: {**sd, "mask_decoder.iou_token.weight": sd["mask_decoder.iou_token.weight"].int()},
                          ["mask_decoder.iou_token.weight is int32, not floating point"]),
}


@pytest.mark.parametrize("case", BAD_STATE_DICTS)
def test_rejects_bad_state_dict(case, tiny_state, tmp_path, capsys):
    make_bad, names = BAD_STATE_DICTS[case]
    source = save_pth(make_bad(tiny_state), tmp_path / "bad.pth")
    message = assert_fails(capsys, source, tmp_path / "out" / "ckpt", *names)
    assert str(source) in message, message


def _truncated(tiny_pth: Path, tmp_path: Path) -> Path:
    data = tiny_pth.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.pth"


def _empty_dir(tiny_pth: Path, tmp_path: Path) -> Path:
    (tmp_path / "model_dir").mkdir()
    (tmp_path / "model_dir" / "config.json").write_text("{}")
    return tmp_path / "model_dir"


def _text_file(tiny_pth: Path, tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("hello")
    return tmp_path / "notes.txt"


BAD_SOURCES = {
    "wrong path": (lambda pth, tmp: tmp / "no_such.pth", ["no_such.pth", "does not exist"]),
    "truncated .pth": (_truncated, ["truncated.pth", "truncated or corrupt"]),
    "directory without weights": (_empty_dir, ["model_dir", "model.safetensors", "pytorch_model.bin"]),
    "not a checkpoint": (_text_file, ["notes.txt", "is not a checkpoint"]),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_rejects_unreadable_source(case, tiny_pth, tmp_path, capsys):
    make_source, names = BAD_SOURCES[case]
    assert_fails(capsys, make_source(tiny_pth, tmp_path), tmp_path / "out" / "ckpt", *names)


def test_existing_output_is_untouched(tiny_pth, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_fails(capsys, tiny_pth, out, str(out), "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_pth, tmp_path):
    """Converting onto a 400 kB tmpfs (a private mount namespace: no root needed where user
    namespaces are allowed): one line naming the output and the OS error, exit 2, nothing left."""
    unshare = shutil.which("unshare")
    assert unshare, "util-linux's unshare is needed to mount a small filesystem"
    full = tmp_path / "full"
    full.mkdir()
    script = (f"mount -t tmpfs -o size=400k tmpfs {full} && "
              f"{sys.executable} -m checkpoints_convert.convert {tiny_pth} {full}/out; "
              f"echo rc=$?; ls -A {full}")
    result = subprocess.run([unshare, "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                            text=True, timeout=300)
    assert result.stdout.split() == ["rc=2"], result.stdout + result.stderr  # rc 2, and `ls` lists nothing
    assert result.stderr.strip() == f"error: {full}/out: cannot write the checkpoint (No space left on device)"


def test_failure_while_saving_leaves_nothing(tiny_pth, tmp_path, monkeypatch):
    def half_save(self, directory, *args, **kwargs):  # the params' write fails halfway
        Path(directory).mkdir()
        (Path(directory) / "partial").write_bytes(b"\0" * 100)
        raise RuntimeError("disk full")

    monkeypatch.setattr(weights.ocp.PyTreeCheckpointer, "save", half_save)
    out = tmp_path / "out" / "ckpt"
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(tiny_pth, out)
    assert not out.exists() and list(out.parent.iterdir()) == [], list(out.parent.iterdir())


# ----------------------------------------------------------------------------- full-size key mapping


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_full_size_mapping(name):
    """Every key of the released layout maps, to the right shape, and back; no forward pass.

    The official model is built on the meta device (names and shapes only); key
    number i holds the constant i, so a swapped pair of same-shaped tensors shows.
    """
    config = get_config(name)
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in reference_model.build_official_for(config).state_dict().items()}
    state = {key: np.broadcast_to(np.float32(i), shape) for i, (key, shape) in enumerate(shapes.items())}
    assert detect_config(state) == config
    params = official_to_flax(state, config)
    check_params_match(abstract_params(config), params, f"converted {name}")
    back = flax_to_official(params)
    assert back.keys() == state.keys(), sorted(back.keys() ^ state.keys())[:5]
    wrong = [k for i, k in enumerate(state)
             if back[k].shape != shapes[k] or back[k].dtype != np.float32 or not np.all(back[k] == i)]
    assert not wrong, f"{name}: tensors not mapped back to themselves: {wrong[:5]} ({len(wrong)} in all)"


def test_round_trip_is_exact(tiny_state):
    state = {key: value.numpy() for key, value in tiny_state.items()}
    back = flax_to_official(official_to_flax(state, get_config("vit_tiny")))
    assert back.keys() == state.keys(), sorted(back.keys() ^ state.keys())
    wrong = [k for k in state if back[k].shape != state[k].shape or not np.array_equal(back[k], state[k])]
    assert not wrong, f"round trip changed {wrong}"


# ----------------------------------------------------------------------------- Hugging Face


def hf_config_for(config: SamConfig) -> transformers.SamConfig:
    """The `transformers.SamConfig` with every size of `config`.

    The mask decoder's LayerNorm eps is set to the official 1e-5: HF's default
    is 1e-6, and the official model is our reference (the weights are the same;
    with 1e-6 HF's decoder differs from the official one by ~1e-4 relative).
    """
    e = config.encoder
    vision = dict(hidden_size=e.embed_dim, output_channels=e.out_chans, num_hidden_layers=e.depth,
                  num_attention_heads=e.num_heads, global_attn_indexes=list(e.global_attn_indexes),
                  image_size=e.image_size, patch_size=e.patch_size, window_size=e.window_size,
                  mlp_ratio=e.mlp_ratio, num_pos_feats=config.prompt_embed_dim // 2)
    prompt = dict(hidden_size=config.prompt_embed_dim, image_size=e.image_size, patch_size=e.patch_size,
                  mask_input_channels=config.mask_in_chans)
    decoder = dict(hidden_size=config.prompt_embed_dim, mlp_dim=config.decoder_mlp_dim,
                   num_hidden_layers=config.decoder_depth, num_attention_heads=config.decoder_num_heads,
                   attention_downsample_rate=config.attention_downsample_rate,
                   num_multimask_outputs=config.num_multimask_outputs, iou_head_depth=config.iou_head_depth,
                   iou_head_hidden_dim=config.iou_head_hidden_dim, layer_norm_eps=1e-5)
    return transformers.SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def random_hf_model(name: str, seed: int = 1) -> transformers.SamModel:
    torch.manual_seed(seed)
    return randomise_hf(transformers.SamModel(hf_config_for(get_config(name))).eval(), seed=seed)


def save_hf_safetensors(model: transformers.SamModel, directory: Path) -> Path:
    """`model.safetensors` as `save_pretrained` writes it: the tied PE copy left out
    (safetensors refuses tensors that share memory)."""
    directory.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != PE_TWIN}
    safetensors.torch.save_file(state, directory / "model.safetensors")
    return directory


@torch.no_grad()
def hf_decode(model: transformers.SamModel, embeddings: torch.Tensor, prompts: dict, multimask: bool):
    """Low-res logits (P, K, 4h, 4w) and IoU (P, K) for P prompts on one image (see
    test_huggingface_mapping for how HF's inputs correspond to the official ones)."""
    kwargs = {}
    if prompts["point_coords"] is not None:
        kwargs.update(input_points=_torch(prompts["point_coords"])[None],
                      input_labels=_torch(prompts["point_labels"], torch.int64)[None])
    if prompts["boxes"] is not None:
        kwargs["input_boxes"] = _torch(prompts["boxes"])[None]
    out = model(image_embeddings=embeddings, multimask_output=multimask, **kwargs)
    return out.pred_masks[0], out.iou_scores[0]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A random vit_tiny-sized HF model and its weights saved the three ways HF models come."""
    model = random_hf_model("vit_tiny")
    root = tmp_path_factory.mktemp("hf_tiny")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")  # both tied copies, one storage
    model.save_pretrained(root / "save_pretrained")
    dirs = {"safetensors": save_hf_safetensors(model, root / "safetensors"), "bin": bin_dir,
            "save_pretrained": root / "save_pretrained"}
    return model, dirs


def test_hf_tied_positional_embedding(hf_tiny):
    model, dirs = hf_tiny
    state = model.state_dict()
    assert PE_KEY in state and PE_TWIN in state, [k for k in state if "positional" in k]
    assert state[PE_KEY].data_ptr() == state[PE_TWIN].data_ptr(), "HF no longer ties the PE copies"
    with safetensors.safe_open(dirs["save_pretrained"] / "model.safetensors", "np") as f:
        assert PE_KEY in f.keys() and PE_TWIN not in f.keys()  # what save_hf_safetensors mimics


def test_hf_formats_convert_identically(hf_tiny, tmp_path, capsys):
    _, dirs = hf_tiny
    converted = {}
    for kind, directory in dirs.items():
        code, stdout, stderr = cli(capsys, directory, tmp_path / kind)
        assert code == 0 and "(vit_tiny, looped)" in stdout, f"{kind}: {stderr}"
        weights = "pytorch_model.bin" if kind == "bin" else "model.safetensors"
        assert metadata(tmp_path / kind)["source"] == f"huggingface:{weights}"
        converted[kind] = load_sam(tmp_path / kind)[1]
    for kind in ("bin", "save_pretrained"):
        assert_params_equal(converted[kind], converted["safetensors"], f"HF {kind} vs safetensors")


def test_hf_differing_tied_copies_are_rejected(hf_tiny, tmp_path, capsys):
    model, _ = hf_tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[PE_TWIN][0, 0] += 1
    source = save_pth(state, tmp_path / "pytorch_model.bin")
    assert_fails(capsys, source, tmp_path / "out" / "ckpt", PE_TWIN, PE_KEY, "differs")


class HFParity:
    """A random HF model, converted through the CLI and loaded; both image embeddings computed once."""

    def __init__(self, name: str, root: Path):
        self.config = get_config(name)
        self.hf = random_hf_model(name)
        source = save_hf_safetensors(self.hf, root / "hf")
        assert main([str(source), str(root / "converted")]) == 0
        self.jax_sam = JaxSam(root / "converted", jit_decode=False)
        image = random_image(self.config)
        with torch.no_grad():
            self.hf_embeddings = self.hf.get_image_embeddings(torch.from_numpy(image))
        self.embeddings = jax.block_until_ready(self.jax_sam.encode(image))


@pytest.fixture(scope="module")
def hf_parity(tmp_path_factory):
    """The released vit_b sizes: ~80 s on 2 CPU cores, mostly the two image encoders.

    (The same checks pass at ~1e-6 on vit_tiny; they are not repeated there, to
    keep the suite fast: the small HF mapping is tested in test_huggingface_mapping.)
    """
    return HFParity("vit_b", tmp_path_factory.mktemp("hf_vit_b"))


def test_hf_image_embeddings(hf_parity):
    ours = np.asarray(hf_parity.embeddings)
    size, dim = hf_parity.config.embedding_size, hf_parity.config.prompt_embed_dim
    assert ours.shape == (1, size, size, dim)
    assert_close(f"HF {hf_parity.config.name} image embeddings", ours.transpose(0, 3, 1, 2),
                 hf_parity.hf_embeddings, EMBEDDING_TOLERANCE)


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("kind", ["points", "box", "points+box"])
def test_hf_masks_and_iou(hf_parity, kind, multimask):
    p = hf_parity
    prompts = make_prompts(kind, p.config.image_size)
    logits, iou = p.jax_sam.decode(p.embeddings, prompts, multimask)
    hf_logits, hf_iou = hf_decode(p.hf, p.hf_embeddings, prompts, multimask)
    name = f"HF {p.config.name} {kind} {'multimask' if multimask else 'single'}"
    assert_close(f"{name} low-res logits", logits, hf_logits, DECODER_TOLERANCE)
    assert_close(f"{name} iou", iou, hf_iou, DECODER_TOLERANCE)
