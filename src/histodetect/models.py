"""Build networks: any timm model by name, the seed's backbones, and our CPU network.

Every model ends in global average pooling, dropout and ONE logit (N, 1). The
sigmoid lives in the loss (`BCEWithLogitsLoss`) and at prediction time: that is
the seed's "dense sigmoid + binary cross-entropy" computed as one log-sum-exp,
numerically the same function but without the overflow of log(sigmoid(x)) for
large |x|.
"""

from __future__ import annotations

import difflib
import pickle
import sys
import warnings
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, to_2tuple
from timm.models import register_model
from torch import Tensor, nn

from histodetect.data.decode import PATCH_SIZE_PX
from histodetect.errors import UserError
from histodetect.hub import create_pretrained

# The seed's Keras backbones under their closest timm names. Keras' Xception is
# the original (Chollet 2017) network, which timm keeps as `legacy_xception`;
# timm's `xception41/65/71` are the later "aligned" variants.
MODEL_ALIASES = {"xception": "legacy_xception"}


class ConvBnAct(nn.Sequential):
    """3x3 convolution, BatchNorm, ReLU: the one building block of HistoTinyNet."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True) if act else nn.Identity(),
        )


class ResidualBlock(nn.Module):
    """Two ConvBnAct with an identity shortcut (ResNet's basic block, He et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBnAct(channels, channels)
        self.conv2 = ConvBnAct(channels, channels, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


def standardise_each_patch(images: Tensor, eps: float = 1e-3) -> Tensor:
    """Give each channel of each image zero mean and unit standard deviation over its pixels.

    images: (N, C, H, W) -> (N, C, H, W). A per-patch stain normalisation at its
    crudest: it removes any per-channel brightness and contrast shift, the way
    scanners and staining batches differ between slides. A near-blank patch has
    its noise stretched to unit spread; 99% of pcam-jpeg's patches spread over 170x `eps`.
    """
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True)
    return (images - mean) / (std + eps)


class HistoTinyNet(nn.Module):
    """A small ResNet for 64-96 px tissue patches that trains on a 2-core CPU.

    A stride-2 stem, then one stage per width: a stride-2 ConvBnAct followed by
    `depth` residual blocks. `cam_layer_name` names the last stage, the map
    Grad-CAM reads (6x6 for the `cpu` preset's 88 px input). With
    `standardise_patches`, each input patch is first standardised on its own
    (`standardise_each_patch`), inside the network, so the export and every
    caller get it with the weights.
    """

    def __init__(
        self,
        # Widths 16-128 beat 24-192 at equal CPU time on 64 px crops of pcam-jpeg
        # (valid AUC 0.906 vs 0.897 in 10 min of one core: 32 vs 19 epochs, 2026-11-27).
        widths: tuple[int, ...] = (16, 32, 64, 128),
        depths: tuple[int, ...] = (0, 1, 1, 1),
        num_classes: int = 1,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        in_chans: int = 3,
        stem_widths: tuple[int, ...] | None = None,  # stride-2 stem convs; default one, of widths[0]
        standardise_patches: bool = False,
    ):
        super().__init__()
        self.standardise_patches = standardise_patches
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = widths[-1]
        stem_widths = stem_widths or (widths[0],)
        self.stem = nn.Sequential(*[
            ConvBnAct(in_chans if i == 0 else stem_widths[i - 1], w, stride=2) for i, w in enumerate(stem_widths)
        ])
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            in_width = stem_widths[-1] if i == 0 else widths[i - 1]
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    ConvBnAct(in_width, width, stride=stride),
                    *[ResidualBlock(width) for _ in range(depth)],
                )
            )
        self.stages = nn.Sequential(*stages)
        self.cam_layer_name = f"stages.{len(stages) - 1}"
        self.feature_info = [
            {"num_chs": w, "reduction": 2 ** (len(stem_widths) + i), "module": f"stages.{i}"}
            for i, w in enumerate(widths)
        ]
        self.reset_classifier(num_classes, global_pool)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (the one logit)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """Replace pooling and the linear layer, as timm models do."""
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) normalised images -> (N, C, H/16, W/16) last-stage features."""
        if self.standardise_patches:
            x = standardise_each_patch(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features -> pooled (N, C) if pre_logits, else logits (N, num_classes)."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _histo_tinynet_cfg(input_size_px: int) -> dict:
    return {
        "architecture": "histo_tinynet",
        "input_size": (3, input_size_px, input_size_px),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "classifier": "fc",
        "first_conv": "stem.0.0",
    }


def _build_histo_net(name: str, pretrained: bool, input_size_px: int, kwargs: dict) -> HistoTinyNet:
    """A HistoTinyNet as timm's registry calls it; there are no hub weights for ours."""
    if pretrained:
        raise UserError(
            f"{name}: there are no published weights for it (pretrained=True); train it or pass --weights FILE"
        )
    # timm's create_model passes these for hub-backed models; ours have none.
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = HistoTinyNet(**kwargs)
    model.pretrained_cfg = {**_histo_tinynet_cfg(input_size_px), "architecture": name}
    model.default_cfg = model.pretrained_cfg
    return model


@register_model
def histo_tinynet(pretrained: bool = False, **kwargs) -> HistoTinyNet:
    """HistoTinyNet, our CPU network; the `cpu` preset trains it on the centre 88 px of a patch."""
    return _build_histo_net("histo_tinynet", pretrained, 88, kwargs)


@register_model
def histo_tinynet_std(pretrained: bool = False, **kwargs) -> HistoTinyNet:
    """histo_tinynet that standardises each patch's channels first (`standardise_each_patch`).

    Made for the stain and scanner shift between slides. On pcam-jpeg, over 4 seeds of
    `default`'s recipe, it scored as histo_tinynet did with 8-view TTA (accuracy 0.881
    vs 0.880, ROC AUC 0.9505 vs 0.9514) and a little better without (0.877 vs 0.871,
    0.947 vs 0.946), so `default` keeps histo_tinynet (BENCHMARKS.md). It ignores a
    per-channel brightness and contrast shift (tested); whether that helps on slides
    that differ more in colour than PCam's is not measured.
    """
    return _build_histo_net("histo_tinynet_std", pretrained, 88, {"standardise_patches": True, **kwargs})


@register_model
def histo_net96(pretrained: bool = False, **kwargs) -> HistoTinyNet:
    """HistoTinyNet for the whole 96 px patch: two stride-2 stem convs (24, 32 wide) take
    it to 24x24, then stages 32-64-128 of two residual blocks each (0.89M parameters).

    The label is about the centre 32x32, but the context around it carries signal:
    per epoch it learns faster than histo_tinynet on the 64 px crop, but per minute of
    CPU it did not win (10 minutes side by side, one thread each: valid AUC 0.900 vs
    0.907 with TTA 8, BENCHMARKS.md), so the `cpu` preset keeps histo_tinynet, on a
    larger crop (88 px) since.
    """
    kwargs = {"stem_widths": (24, 32), "widths": (32, 64, 128), "depths": (2, 2, 2), **kwargs}
    return _build_histo_net("histo_net96", pretrained, 96, kwargs)


@register_model
def histo_net(pretrained: bool = False, **kwargs) -> HistoTinyNet:
    """HistoTinyNet twice as wide, for GPUs: stages 32-64-128-256 of 1, 1, 2, 1 residual
    blocks after a 32-wide stride-2 stem (2.3M parameters), on the centre 88 px of a patch.

    For larger training sets than pcam-jpeg's 8,000 patches: on those it peaked early
    (valid AUC 0.946 at epoch 42 of 107 on an H200) and scored no better than
    histo_tinynet (BENCHMARKS.md, GPU).
    """
    kwargs = {"widths": (32, 64, 128, 256), "depths": (1, 1, 2, 1), **kwargs}
    return _build_histo_net("histo_net", pretrained, 88, kwargs)


def known_model_names() -> list[str]:
    """Every name create_model accepts: timm's registry plus our aliases."""
    return sorted(set(timm.list_models()) | set(MODEL_ALIASES))


def forward_failure(model: nn.Module, side_px: int) -> str | None:
    """Why `model` cannot score one blank side_px x side_px image, in one line; None when it can."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, side_px, side_px))
    except Exception as exc:  # noqa: BLE001 (any model's own complaint)
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        model.train(was_training)
    return None


# timm's arguments that build a model for another input size, most capable first: dynamic_img_size
# resamples the position embeddings to each input (progressive crops, 96 px TTA), dynamic_img_pad
# pads a side that is not a multiple of the patch (88 px into 16 px patches) rather than dropping its edge.
_INPUT_SIZE_KWARGS = ("img_size", "dynamic_img_size", "dynamic_img_pad")


def input_size_kwargs(timm_name: str, side_px: int) -> dict:
    """What `timm_name` needs to take side_px crops: {} when it takes them as timm builds it.

    timm builds vision transformers and their kin for the ImageNet size (224 px) and marks
    them `fixed_input_size`; built with `img_size`, they take PCam's crops. Decided on a
    random-init build at side_px alone, so that training and prediction, which pass the same
    largest crop, build the same network; the global random state is left as it was.
    """
    if timm_name.startswith("histo_") or not timm.models.get_pretrained_cfg_value(timm_name, "fixed_input_size"):
        return {}
    with torch.random.fork_rng(devices=[]):
        as_timm_builds_it = _build(timm_name, timm_name, False, {"num_classes": 1, "global_pool": "avg"})
        if forward_failure(as_timm_builds_it, side_px) is None:
            return {}
        # Padded crops fill whole patches: a grid of the position embeddings' own size, which
        # needs no resampling (its antialiased bicubic has no ONNX operator).
        patch_px = max(to_2tuple(getattr(getattr(as_timm_builds_it, "patch_embed", None), "patch_size", 1)))
        kwargs = {"img_size": -(-side_px // patch_px) * patch_px, "dynamic_img_size": True, "dynamic_img_pad": True}
        while True:
            try:
                timm.create_model(timm_name, num_classes=1, global_pool="avg", **kwargs)
                return kwargs
            except AssertionError:  # it takes the size but cannot be built for it (nest's blocks); the check says so
                return {}
            except TypeError as error:  # "... got an unexpected keyword argument 'dynamic_img_pad'"
                refused = next((key for key in _INPUT_SIZE_KWARGS if f"'{key}'" in str(error)), None)
                if refused is None:
                    raise
                if refused == "img_size":
                    return {}  # it cannot be built for another size; the caller's check names the model
                del kwargs[refused]
                kwargs["img_size"] = side_px  # unpadded, the model must be built for the crop itself


def _build(name: str, timm_name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """timm.create_model, a model timm cannot give a GAP head (distilled, token-pooled) refused in one line."""
    try:
        return create_pretrained(name, timm_name, **kwargs) if pretrained else timm.create_model(timm_name, **kwargs)
    except AssertionError as error:  # timm's own check of its arguments, e.g. deit's distilled head
        raise UserError(f"model '{name}': timm cannot build it with global average pooling and one logit ({error}); "
                        "choose another model, e.g. its non-distilled twin") from None
    except RuntimeError as error:  # built for the crop, weights timm does not resize (cait's, convit's position embeddings)
        if not (pretrained and str(error).startswith("Error(s) in loading state_dict")):
            raise
        mismatch = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "")
        raise UserError(f"model '{name}': timm cannot fit its pretrained weights to the {kwargs.get('img_size')} px "
                        f"model built for the crop ({mismatch.rstrip('.')}); train it without --pretrained, "
                        "or choose another model") from None


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    weights: Path | None = None,
    drop_rate: float = 0.0,
    input_size_px: int = PATCH_SIZE_PX,
) -> nn.Module:
    """Build `name` (a timm name or alias) with GAP, dropout and one logit; random init by default.

    pretrained=True takes timm's hub weights (from the local cache, else the network);
    weights=FILE loads a local .safetensors or torch state dict, skipping a classifier
    of another shape. input_size_px is the largest side the model will be fed (a run's
    crop, else the whole 96 px patch): a model timm builds for one size (a vision
    transformer) is built for it (`input_size_kwargs`).
    """
    timm_name = MODEL_ALIASES.get(name, name)
    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(name, known_model_names(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise UserError(f"model '{name}': not a timm model or histodetect alias; {hint}")
    kwargs = {"num_classes": 1, "drop_rate": drop_rate, "global_pool": "avg",
              **input_size_kwargs(timm_name, input_size_px)}
    model = _build(name, timm_name, pretrained, kwargs)
    if not timm_name.startswith("histo_"):
        # timm's cfg names the ImageNet weights' input size (224, 299); here the
        # model is fed PCam patches or their centre crops.
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, input_size_px, input_size_px)}
    if weights is not None:
        load_weights(model, weights)
    return model


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: weights file not found; check the --weights path")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "numpy" in str(error):  # what histodetect's last.pt holds besides weights (the RNG states)
            raise UserError(f"{path}: a training checkpoint with more than weights (a run's last.pt?); pass "
                            "the run's checkpoints/best.pt, or a state dict or .safetensors file") from None
        raise UserError(f"{path}: not a readable .safetensors file or torch state dict (UnpicklingError); "
                        "re-export or re-download it") from None
    except (SafetensorError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise UserError(
            f"{path}: not a readable .safetensors file or torch state dict "
            f"({type(error).__name__}); re-export or re-download it"
        ) from error
    if isinstance(state, dict):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(state.get(wrapper_key), dict):
                state = state[wrapper_key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(
            f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return state


# Names timm and torchvision give classifier heads: a file's head may be named otherwise than the model's.
_OTHER_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.", "head_drop.")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = model.get_classifier()
    return tuple(f"{name}." for name, module in model.named_modules() if module is classifier)


def _matched(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], int, list[str], list[str]]:
    """What of `state` loads into `model`: (tensors to load, head tensors left fresh, backbone tensors
    missing or of another shape, tensors the model has no place for)."""
    classifier_prefixes = _classifier_prefixes(model)
    # Built with global average pooling, a vision transformer normalises after pooling (fc_norm, left
    # fresh as timm's --pretrained leaves it) and its `norm` before pooling is an Identity.
    fresh_prefixes = (*classifier_prefixes, "fc_norm.")
    identities = tuple(f"{name}." for name, module in model.named_modules() if name and isinstance(module, nn.Identity))
    to_load, skipped_head, mismatched = {}, 0, []
    for key, expected in model.state_dict().items():
        found = state.get(key)
        if found is not None and found.shape == expected.shape:
            to_load[key] = found
        elif key.startswith(fresh_prefixes):
            skipped_head += 1
        elif not key.endswith("num_batches_tracked"):  # absent from some exporters' files
            mismatched.append(key)
    # Tensors the model has no place for: a deeper relative (resnet34's file for resnet18)
    # would otherwise load its first layers silently. Another head's names are fine.
    head_names = (*classifier_prefixes, *_OTHER_HEAD_PREFIXES, *identities)
    extra = [key for key in state if key not in to_load and not key.startswith(head_names)
             and not key.endswith("num_batches_tracked")]
    return to_load, skipped_head, mismatched, extra


def _adapted_by_timm(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """`state` as timm adapts it when it loads --pretrained weights into `model` as built (a vision
    transformer built for the crop: its position embeddings resampled to the crop's grid); None
    where the model's family has no such step or it fails on this file."""
    adapt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if adapt is None:
        return None
    try:
        return adapt(dict(state), model)
    except Exception:  # noqa: BLE001 (a file for another architecture: load_weights says so in one line)
        return None


def load_weights(model: nn.Module, path: Path) -> int:
    """Load a local state dict into `model`; returns how many classifier tensors were skipped.

    The backbone must match exactly (else the file is for another architecture);
    classifier tensors of another shape (e.g. ImageNet's 1000 classes) keep their
    fresh initialisation. A file that does not match as it is gets the adaptation timm
    gives the same weights with --pretrained (a vision transformer's 224 px position
    embeddings resampled to the crop's grid).
    """
    path = Path(path)
    state = _read_state_dict(path)
    to_load, skipped_classifier, mismatched, extra = _matched(model, state)
    if mismatched or extra:
        adapted = _adapted_by_timm(model, state)
        if adapted is not None and not any(_matched(model, adapted)[2:]):
            to_load, skipped_classifier, mismatched, extra = _matched(model, adapted)
    if mismatched:
        n_backbone = len(mismatched) + sum(not k.startswith(_classifier_prefixes(model)) for k in to_load)
        raise UserError(
            f"{path}: {len(mismatched)} of {n_backbone} backbone tensors missing or of another shape "
            f"(first: '{mismatched[0]}'); these are weights for another architecture, "
            f"pass a file saved from {describe_model(model)['name']}"
        )
    if extra:
        raise UserError(
            f"{path}: {len(extra)} tensors that {describe_model(model)['name']} does not have (first: '{extra[0]}'); "
            "these are weights for another architecture, pass a file saved from this one"
        )
    model.load_state_dict(to_load, strict=False)
    if skipped_classifier:
        warnings.warn(
            f"{path}: skipped {skipped_classifier} classifier tensors of another shape "
            "(kept the fresh one-logit head)",
            stacklevel=2,
        )
    return skipped_classifier


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_model(model: nn.Module) -> dict:
    """Name, trainable parameter count and expected input size (C, H, W), for run cards."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "name": cfg.get("architecture", type(model).__name__),
        "params": count_parameters(model),
        "input_size": tuple(cfg.get("input_size", (3, 96, 96))),
    }
