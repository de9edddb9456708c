"""Which timm architectures histodetect builds and feeds PCam crops: a compatibility sweep.

For each model name: build it as training does (random init, GAP + dropout + one logit,
`create_model(..., input_size_px=88)`: `default`'s crop), then score one blank batch at
every side a run may feed it (96 px whole patches, 88 px `default` crop, 76 and 64 px the
`cpu` preset's progressive crops). Prints a markdown table for BENCHMARKS.md.

    OMP_NUM_THREADS=1 python benchmarks/timm_models.py            # the representative list below
    OMP_NUM_THREADS=1 python benchmarks/timm_models.py vit_small_patch16_224 convnext_tiny
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from histodetect.errors import UserError
from histodetect.models import create_model, forward_failure, input_size_kwargs

# One or two of each family timm has, under ~100M parameters.
MODELS = [
    # CNNs: any input size
    "resnet18", "resnet50d", "seresnext26d_32x4d", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_100",
    "mobilenetv2_100", "ghostnet_100", "regnetx_002", "convnext_atto", "convnextv2_atto", "densenet121",
    "xception41", "legacy_xception", "efficientvit_b0", "fastvit_t8", "mobilevit_xxs", "poolformer_s12",
    "edgenext_xx_small", "repvit_m0_9", "hgnet_tiny", "mobileone_s0", "inception_v3",
    # built for one input size by timm (vision transformers and kin)
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit3_small_patch16_224", "eva02_tiny_patch14_224",
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "beit_base_patch16_224", "cait_xxs24_224",
    "mixer_b16_224", "maxvit_nano_rw_256", "levit_128s", "tiny_vit_5m_224",
    # cannot have a GAP one-logit head
    "deit_tiny_distilled_patch16_224", "pit_ti_224",
]
SIDES_PX = (96, 88, 76, 64)
CROP_PX = 88


def check(name: str) -> tuple[str, ...]:
    started = time.perf_counter()
    try:
        built_for = input_size_kwargs(name, CROP_PX).get("img_size", "-")
        model = create_model(name, input_size_px=CROP_PX)
    except UserError as error:
        return name, "-", "-", *("refused" for _ in SIDES_PX), f"{time.perf_counter() - started:.1f}", str(error)[:120]
    params_m = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}"
    failures = {side: forward_failure(model, side) for side in SIDES_PX}
    first = next((f"{side} px: {why}" for side, why in failures.items() if why), "")
    return (name, params_m, str(built_for), *("ok" if failures[side] is None else "fails" for side in SIDES_PX),
            f"{time.perf_counter() - started:.1f}", first[:120])


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    header = ("model", "params (M)", "built for (px)", *(f"{side} px" for side in SIDES_PX), "s", "first failure")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in names:
        print("| " + " | ".join(check(name)).replace("\n", " ") + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or MODELS)
