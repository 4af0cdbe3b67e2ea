"""The official PyTorch SAM (`segment-anything` 1.0), importable without torchvision.

For tests, benchmarks and the demo: it builds official models of any sam_jax
config, e.g. to write a randomly initialised checkpoint with the released key
layout. It needs torch and segment-anything (`pip install '.[torch]'`), works
from a plain install, and sam_jax never imports it.

`segment_anything/__init__.py` imports the automatic mask generator, which
imports torchvision at import time, and torchvision has no CPU build here.
The model itself (`segment_anything.modeling`) needs only torch, so this module
registers a bare `segment_anything` package (no `__init__` executed) and
imports `segment_anything.modeling` from the installed files, unchanged.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types

import torch


def _import_modeling():
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed: pip install segment-anything==1.0")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["segment_anything"] = package
    return importlib.import_module("segment_anything.modeling")


modeling = _import_modeling()


def official_module(name: str, stand_ins: str | os.PathLike) -> types.ModuleType:
    """An official `segment_anything.<name>` module that imports torchvision (e.g. "predictor",
    "automatic_mask_generator"), imported with `stand_ins` (a folder holding a `torchvision`
    package of stand-ins for the few functions it calls; the tests keep theirs in
    `tests/stand_ins`) first on the import path."""
    stand_ins = os.fspath(stand_ins)
    if not os.path.isdir(os.path.join(stand_ins, "torchvision")):
        raise ImportError(f"{stand_ins} holds no torchvision stand-ins (a source checkout has tests/stand_ins)")
    sys.path.insert(0, stand_ins)
    try:
        return importlib.import_module(f"segment_anything.{name}")
    finally:
        sys.path.remove(stand_ins)


# The official configurations, as in `segment_anything/build_sam.py`.
ENCODER_CONFIGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def build_official_sam(
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes,
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    decoder_depth: int = 2,
    iou_head_hidden_dim: int = 256,
) -> "modeling.Sam":
    """Builds `modeling.Sam` exactly as `build_sam._build_sam` does, with every size a parameter.

    With the defaults and an `ENCODER_CONFIGS` entry this is the released
    model; smaller sizes give the tiny variants used by fast tests.
    """
    embedding_size = image_size // patch_size
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=depth,
            embed_dim=embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(
                depth=decoder_depth,
                embedding_dim=prompt_embed_dim,
                mlp_dim=decoder_mlp_dim,
                num_heads=decoder_num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


@torch.no_grad()
def randomize_zero_initialised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives random values to the tensors the official init leaves constant.

    A freshly built SAM has zero position embeddings and relative position
    tables, and LayerNorms with weight 1 and bias 0; parity on those would not
    notice a missing rel-pos term or a swapped LayerNorm scale and bias. This
    perturbs them (and nothing else) with seeded noise of a realistic size.
    """
    generator = torch.Generator().manual_seed(seed)

    def noise(tensor, scale):
        return scale * torch.randn(tensor.shape, generator=generator)

    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, modeling.common.LayerNorm2d)):
            module.weight.copy_(1.0 + noise(module.weight, 0.1))
            module.bias.copy_(noise(module.bias, 0.05))
        for leaf in ("rel_pos_h", "rel_pos_w", "pos_embed"):
            tensor = module._parameters.get(leaf)
            if tensor is not None:
                tensor.copy_(noise(tensor, 0.02))
    return model


def build_official_for(config) -> "modeling.Sam":
    """The official model with the sizes of a `sam_jax.SamConfig` (any registered variant)."""
    e = config.encoder
    return build_official_sam(
        e.embed_dim, e.depth, e.num_heads, e.global_attn_indexes,
        image_size=e.image_size, patch_size=e.patch_size, window_size=e.window_size,
        prompt_embed_dim=config.prompt_embed_dim, mask_in_chans=config.mask_in_chans,
        decoder_mlp_dim=config.decoder_mlp_dim, decoder_num_heads=config.decoder_num_heads,
        decoder_depth=config.decoder_depth, iou_head_hidden_dim=config.iou_head_hidden_dim,
    )


def state_dict_numpy(model: torch.nn.Module) -> dict:
    """The model's state_dict as numpy arrays (sharing memory with the tensors)."""
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def official_onnx_model(model: "modeling.Sam", stand_ins: str | os.PathLike, **options) -> torch.nn.Module:
    """The official `SamOnnxModel` (`segment_anything.utils.onnx`) as on segment-anything's main branch.
    PyPI's 1.0 predates its commit e9f2d58 ("Fix break in computation graph due to typecast to python
    int"): there the crop size is traced as a constant, so an export from 1.0 gives right masks only
    for images of the dummy input's aspect ratio (upstream issue #56). `mask_postprocessing` below is
    that commit's; everything else is the installed official class. `options`: its
    return_single_mask (default False), use_stability_score, return_extra_metrics."""
    import torch.nn.functional as F

    onnx_module = official_module("utils.onnx", stand_ins)

    class SamOnnxModelMain(onnx_module.SamOnnxModel):
        def mask_postprocessing(self, masks, orig_im_size):
            masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
            prepadded_size = self.resize_longest_image_size(orig_im_size, self.img_size).to(torch.int64)
            masks = masks[..., : prepadded_size[0], : prepadded_size[1]]
            orig_im_size = orig_im_size.to(torch.int64)
            h, w = orig_im_size[0], orig_im_size[1]
            return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    return SamOnnxModelMain(model, **{"return_single_mask": False, **options})


def export_official_onnx(model: "modeling.Sam", config, path: str | os.PathLike, stand_ins: str | os.PathLike,
                         **options) -> None:
    """`scripts/export_onnx_model.py`'s export of `official_onnx_model(model, **options)`: its dummy
    inputs, input and output names, dynamic axes and opset 17 (TorchScript exporter)."""
    import warnings

    e, m = config.embedding_size, config.low_res_mask_size
    dummy = {"image_embeddings": torch.randn(1, config.prompt_embed_dim, e, e, dtype=torch.float),
             "point_coords": torch.randint(low=0, high=config.image_size, size=(1, 5, 2), dtype=torch.float),
             "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
             "mask_input": torch.randn(1, 1, m, m, dtype=torch.float),
             "has_mask_input": torch.tensor([1], dtype=torch.float),
             "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings
        torch.onnx.export(official_onnx_model(model, stand_ins, **options), tuple(dummy.values()), os.fspath(path),
                          export_params=True, opset_version=17, do_constant_folding=True,
                          input_names=list(dummy), output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          dynamo=False)
