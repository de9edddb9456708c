"""Class activation maps: where in a patch the model found its evidence of tumour.

Grad-CAM (Selvaraju et al. 2017), Grad-CAM++ (Chattopadhay et al. 2018) and
HiResCAM (Draelos & Carin 2020) of the tumour logit at one feature-map layer,
upsampled to the patch. At a layer that feeds global average pooling and the
linear head directly (every default layer here), the logit's gradient is the same
at every position, so Grad-CAM and HiResCAM give the same map (the CAM of Zhou
et al. 2016); Grad-CAM++ weighs positions differently, and the three part ways
at earlier layers (--layer). They are written here in torch rather than taken from
the `grad-cam` package (whose maps they match; tests/test_explain.py checks it):

* its hooks record every forward pass through the layer, from any thread, so two
  web requests (or a prediction in another thread) mix their activations; ours
  record only the calling thread's pass;
* it back-propagates to the input and fills every parameter's `.grad` on the
  shared model; here autograd stops at the layer (torch.autograd.grad);
* it goes through numpy and OpenCV per image; here the maps stay on the device;
* it takes a layer's output as is, so a later in-place operation (timm's
  `act(bn(x))` with inplace ReLU, `x += shortcut`) corrupts the gradient; the
  hook here hands the rest of the network a copy.
"""

from __future__ import annotations

import difflib
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import preprocess_batch
from ..data.decode import PATCH_SIZE_PX
from ..data.synthetic import CENTRE_SIZE_PX, CENTRE_START_PX
from ..errors import UserError

CAM_METHODS = ("gradcam", "gradcam++", "hirescam")

# The layer each backbone family of the presets is explained at: the last
# feature map before global pooling, after its activation (timm class -> module).
# `histo_tinynet` names its own (`cam_layer_name`); any other model gets the
# last module to finish inside `forward_features` with the features' shape.
DEFAULT_CAM_LAYERS = {
    "ResNet": "layer4",  # resnet*, resnext*, seresnet*
    "EfficientNet": "bn2",  # efficientnet_*, mobilenetv2_* (bn2 is BatchNorm + activation)
    "Xception": "act4",  # legacy_xception: act4 is the ReLU after bn4
    "ConvNeXt": "stages",  # convnext_*: the last stage's output (norm_pre is an identity)
}
# Listing valid layers in an error: the module names this deep (at most one dot),
# the last of them when there are more.
_LISTED_LAYER_DEPTH = 2
_LISTED_LAYERS = 16
_CAM_BATCH_SIZE = 64  # patches per backward pass; bounds the memory of the kept activations
_EPS = 1e-7  # the grad-cam package's, so that our maps equal its maps


def check_cam_method(method: str) -> str:
    """`method` if it is one of CAM_METHODS, else a UserError listing them."""
    if method not in CAM_METHODS:
        raise UserError(f"--method {method!r}: expected one of {', '.join(CAM_METHODS)}")
    return method


def _model_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture", type(model).__name__)


def token_grid_side(model: torch.nn.Module, shape: tuple[int, ...]) -> int | None:
    """The side of the square grid of patch tokens in a (N, T, C) output of a vision transformer:
    T is its prefix tokens (class, registers: `num_prefix_tokens`) plus side x side patches, C its
    features. None for any other shape."""
    if len(shape) != 3 or shape[2] != getattr(model, "num_features", None):
        return None
    patches = shape[1] - (getattr(model, "num_prefix_tokens", 0) or 0)
    side = math.isqrt(patches) if patches > 0 else 0
    return side if side * side == patches and side > 0 else None


@torch.no_grad()
def feature_map_layers(model: torch.nn.Module, input_px: int) -> dict[str, tuple[int, ...]]:
    """Modules of `forward_features` that output a feature map, in the order they finish.

    Found by running one blank image of `input_px` through the model with a hook
    on every module; returns {module name: output shape}. A map is (N, C, H, W), or
    (N, H, W, C) for a channels-last model (`channels_last_maps`); for a vision
    transformer, whose features are tokens, it is each module's (N, T, C) tokens
    that hold a square grid of patches (`token_grid_side`), and never the 4-D
    tensors inside its attention. Empty where there is neither.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    owner = threading.get_ident()

    def record(name: str):
        def hook(module, inputs, output):
            if threading.get_ident() == owner and isinstance(output, Tensor) and output.ndim in (3, 4):
                shapes.pop(name, None)  # a module run twice counts where it last finished
                shapes[name] = tuple(output.shape)
        return hook

    parameter = next(model.parameters(), None)
    if parameter is None:  # an exported model (load_exported_run): ONNX Runtime and TorchScript give no gradients
        raise UserError(f"{_model_name(model)}: no PyTorch weights to take gradients of; class activation maps "
                        "need the run loaded with load_run(RUN_DIR), not an export")
    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        device = parameter.device
        blank = torch.zeros(1, 3, input_px, input_px, device=device)
        forward = model.forward_features if hasattr(model, "forward_features") else model
        features = forward(blank)
    finally:
        for handle in handles:
            handle.remove()
    if hasattr(model, "forward_features") and isinstance(features, Tensor) and features.ndim == 3:
        if token_grid_side(model, tuple(features.shape)) is None:
            return {}
        return {name: shape for name, shape in shapes.items() if token_grid_side(model, shape) is not None}
    return {name: shape for name, shape in shapes.items() if len(shape) == 4}


def default_cam_layer(model: torch.nn.Module, layers: dict[str, tuple[int, ...]]) -> str:
    """The default layer to explain `model` at (see DEFAULT_CAM_LAYERS), given its `feature_map_layers`."""
    named = getattr(model, "cam_layer_name", None) or DEFAULT_CAM_LAYERS.get(type(model).__name__)
    if named in layers:
        return named
    if not layers:
        raise UserError(f"{_model_name(model)}: no layer outputs a feature map (N, C, H, W) or a grid of patch "
                        "tokens; CAMs need a CNN or a vision transformer")
    # The features' shape is the shape of the last module to finish inside forward_features.
    final_shape = list(layers.values())[-1]
    return [name for name, shape in layers.items() if shape == final_shape][-1]


def resolve_cam_layer(model: torch.nn.Module, layer: str | None, input_px: int) -> str:
    """The layer name to explain at: `layer` if it outputs a feature map, else the default; UserError otherwise."""
    layers = feature_map_layers(model, input_px)
    default = default_cam_layer(model, layers)
    if layer is None or layer == default:
        return default
    if layer in layers:
        return layer
    shallow = [name for name in layers if name.count(".") < _LISTED_LAYER_DEPTH]
    listed = ("... " if len(shallow) > _LISTED_LAYERS else "") + ", ".join(shallow[-_LISTED_LAYERS:])
    close = difflib.get_close_matches(layer, list(layers), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    module_names = {name for name, _ in model.named_modules()}
    found = "is not a feature map (N, C, H, W) of forward_features" if layer in module_names else "no such layer"
    raise UserError(f"--layer {layer}: {found} in {_model_name(model)}; {hint}"
                    f"layers with feature maps: {listed} (default {default})")


def cam_from_activations(activations: Tensor, gradients: Tensor, method: str) -> Tensor:
    """A class activation map (N, h, w), >= 0, from a layer's activations and the logit's gradients (N, C, h, w)."""
    if method == "gradcam":
        weights = gradients.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        cam = (weights * activations).sum(dim=1)
    elif method == "gradcam++":
        # Chattopadhay et al. 2018, eq. 19, with the ReLU of eq. 7, as the grad-cam package has it.
        grads_2, grads_3 = gradients**2, gradients**3
        activation_sum = activations.sum(dim=(2, 3), keepdim=True)
        alpha = grads_2 / (2 * grads_2 + activation_sum * grads_3 + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        weights = (F.relu(gradients) * alpha).sum(dim=(2, 3), keepdim=True)
        cam = (weights * activations).sum(dim=1)
    else:
        check_cam_method(method)
        cam = (gradients * activations).sum(dim=1)  # HiResCAM: no averaging, faithful to each cell's gradient
    return F.relu(cam)


def upsample_to_patch(cams: Tensor, crop_px: int, patch_px: int = PATCH_SIZE_PX) -> Tensor:
    """Maps (N, h, w) -> (N, patch_px, patch_px) in [0, 1]: bilinear to the crop the model saw,
    scaled per map by its maximum after subtracting its minimum, placed where the crop sits (0 outside)."""
    side_px = crop_px or patch_px
    maps = F.interpolate(cams[:, None], size=(side_px, side_px), mode="bilinear", align_corners=False)[:, 0]
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (_EPS + flat.max(dim=1, keepdim=True).values)
    out = torch.zeros(len(cams), patch_px, patch_px, dtype=maps.dtype, device=maps.device)
    top = (patch_px - side_px) // 2  # as augment's centre crop
    out[:, top : top + side_px, top : top + side_px] = flat.view(-1, side_px, side_px)
    return out


def channels_last_maps(model: torch.nn.Module) -> bool:
    """Whether `model` keeps its feature maps (N, H, W, C): timm's swin, mambaout and sequencer
    say so as output_fmt 'NHWC'. Read as (N, C, H, W), their CAM was a (H, C) strip, silently."""
    output_fmt = getattr(model, "output_fmt", None)
    return getattr(output_fmt, "value", output_fmt) == "NHWC"


def _cam_batch(model: torch.nn.Module, layer: torch.nn.Module, layer_name: str, x: Tensor,
               method: str) -> tuple[Tensor, Tensor]:
    """(maps (B, h, w), logits (B,)) for normalised inputs x (B, 3, H, W): one forward, one backward to the layer."""
    captured: list[Tensor] = []
    owner = threading.get_ident()

    def keep_output(module, inputs, output):
        if threading.get_ident() != owner:
            return None
        captured.append(output)
        return output.clone()  # the rest of the network may modify its input in place

    handle = layer.register_forward_hook(keep_output)
    try:
        # The input requires grad so the layer's output does even when the weights are frozen.
        logits = model(x.detach().requires_grad_(True)).float().reshape(-1)  # (B,)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise UserError(f"--layer {layer_name}: runs {len(captured)} times per forward pass; "
                        "choose the block around it (see the layers listed for a wrong name)")
    (gradients,) = torch.autograd.grad(logits.sum(), captured[0])
    activations = captured[0].detach()
    if activations.ndim == 3:  # a vision transformer's tokens (N, prefix + side^2, C) -> (N, C, side, side)
        side = token_grid_side(model, tuple(activations.shape))
        activations, gradients = (t[:, t.shape[1] - side * side :].unflatten(1, (side, side)).permute(0, 3, 1, 2)
                                  for t in (activations, gradients))
        cams = cam_from_activations(activations.float(), gradients.float(), method)
        patch_px = max(getattr(getattr(model, "patch_embed", None), "patch_size", None) or (0,))
        return (token_map_pixels(cams, patch_px, x.shape[-1]) if patch_px else cams), logits.detach()
    if channels_last_maps(model):  # (N, H, W, C) -> (N, C, H, W)
        activations, gradients = activations.permute(0, 3, 1, 2), gradients.permute(0, 3, 1, 2)
    return cam_from_activations(activations.float(), gradients.float(), method), logits.detach()


def token_map_pixels(cams: Tensor, patch_px: int, input_px: int) -> Tensor:
    """Maps of patch tokens (N, side, side) -> (N, input_px, input_px), each token over its own pixels.

    The grid covers side * patch_px pixels from the top left: more than the input where the
    patch embedding padded its right and bottom (88 px in 16 px patches: 96), fewer where it
    dropped them (80); stretched over the input, the cells sat up to 8 px off their pixels.
    """
    covered = cams.shape[-1] * patch_px
    maps = F.interpolate(cams[:, None], size=(covered, covered), mode="bilinear", align_corners=False)[:, 0]
    short = max(0, input_px - covered)  # pixels no token saw: no evidence
    return F.pad(maps, (0, short, 0, short))[:, :input_px, :input_px]


def class_activation_maps(model: torch.nn.Module, patches_uint8: np.ndarray, *, mean, std, crop_px: int,
                          device: torch.device, method: str = "gradcam",
                          layer: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """CAMs of the tumour logit: (maps float32 (N, 96, 96) in [0, 1], logits (N,), layer name).

    The model sees each patch as it does in prediction (centre crop, one view);
    the map of the crop is placed where the crop sits and is 0 outside it.
    """
    check_cam_method(method)
    input_px = crop_px or PATCH_SIZE_PX
    layer_name = resolve_cam_layer(model, layer, input_px)
    layer_module = dict(model.named_modules())[layer_name]
    maps, logits = [], []
    # Callers may hold inference mode (a web server, a notebook); the maps need autograd.
    with torch.inference_mode(False), torch.enable_grad():
        for begin in range(0, len(patches_uint8), _CAM_BATCH_SIZE):
            batch = torch.from_numpy(np.ascontiguousarray(patches_uint8[begin : begin + _CAM_BATCH_SIZE])).to(device)
            x = preprocess_batch(batch, mean, std, crop_px=crop_px)  # (B, 3, H, W)
            cams, batch_logits = _cam_batch(model, layer_module, layer_name, x, method)
            maps.append(upsample_to_patch(cams, crop_px).cpu().numpy())
            logits.append(batch_logits.cpu().numpy())
    if not maps:
        return np.empty((0, PATCH_SIZE_PX, PATCH_SIZE_PX), np.float32), np.empty(0, np.float32), layer_name
    return np.concatenate(maps).astype(np.float32), np.concatenate(logits), layer_name


def centre_fraction(cams: np.ndarray) -> np.ndarray:
    """Share of each map's mass (N,) inside the labelled centre square (pixels 32..63); 0 for empty maps."""
    centre_px = slice(CENTRE_START_PX, CENTRE_START_PX + CENTRE_SIZE_PX)
    centre = cams[:, centre_px, centre_px].sum(axis=(1, 2))
    total = cams.sum(axis=(1, 2))
    return np.divide(centre, total, out=np.zeros_like(total, dtype=np.float64), where=total > 0)
