"""Grad-CAM heatmaps: where in an image a model looked for a class (captum's LayerGradCam on the body's last block).

captum (PyTorch's own attribution library, a pure-Python wheel needing only matplotlib) is used rather than the
`grad-cam` package, which pulls in OpenCV, SciPy and ttach for the same few lines of arithmetic.
The heatmap covers the image as validation preprocesses it (core.bundle.preprocess): the centre square.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from PIL import Image, ImageOps
from torch import nn

from core.bundle import Bundle, preprocess
from core.config import ARCHS
from core.images import upright_rgb

OVERLAY_MAX_SIDE = 512  # the overlay's largest side: plenty for a page or a report, small for a 12 MP photo
ALPHA = 0.5  # share of the colour map in the blend (pytorch-grad-cam's show_cam_on_image uses the same)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# captum hooks the target layer for the length of one call: two sessions sharing a cached model must take turns
_LOCK = threading.Lock()


def target_layer(model: nn.Sequential, arch: str) -> nn.Module:
    """The last convolutional block of `model`'s body (Loupe models are Sequential(body, head)).

    That is the body's last child, stepping back over a trailing pooling layer, which only halves the map:
    resnet18/34/50 layer4; squeezenet1_1 the last Fire; vgg16_bn the ReLU of its last conv (features[42],
    before the final max-pool); mobilenet_v3_small/large and efficientnet_b0 the last Conv2dNormActivation;
    convnext_tiny the last stage of CNBlocks. tests/test_explain.py checks each one.
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(ARCHS)}.")
    children = list(model[0].children()) or [model[0]]
    while len(children) > 1 and isinstance(children[-1], _POOLS):
        children.pop()
    return children[-1]


def gradcam(bundle: Bundle, image: Image.Image, class_index: int | None = None) -> np.ndarray:
    """A [size, size] float32 heatmap in 0-1 of the evidence for `class_index` (default: the predicted class)
    over the image's centre square as the model sees it; all zeros when nothing speaks for the class."""
    model, meta = bundle.model.eval(), bundle.meta
    if class_index is not None and not 0 <= class_index < meta.n_out:
        raise ValueError(f"class index {class_index} is out of range for {meta.n_out} classes.")
    x = preprocess(bundle, [image])
    with _LOCK, torch.inference_mode(False), torch.enable_grad():  # the callers may run under no_grad
        if class_index is None:
            with torch.no_grad():
                class_index = int(model(x).argmax(dim=1)[0])  # the most probable class, softmax or sigmoid alike
        cam = LayerGradCam(model, target_layer(model, meta.arch))
        # relu_attributions: Grad-CAM keeps only what speaks for the class (Selvaraju et al., eq. 2)
        attr = cam.attribute(x, target=class_index, relu_attributions=True).detach().float()
    # bilinear, not captum's default nearest: a 7x7 map in blocks would hide where the peak lies
    heat = F.interpolate(attr, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    top = float(heat.max())
    return (heat / top if top > 0 else heat).astype(np.float32)


def _colours(heat: np.ndarray) -> np.ndarray:
    """[H, W] in 0-1 -> [H, W, 3] uint8: matplotlib's turbo when it is installed (captum needs it), else a
    blue-green-yellow-red ramp in numpy."""
    try:
        from matplotlib import colormaps
    except ImportError:
        stops = np.array([[0, 0, 128], [0, 160, 255], [60, 220, 90], [255, 220, 0], [220, 20, 20]], dtype=np.float32)
        pos = heat * (len(stops) - 1)
        low = np.floor(pos).astype(int).clip(0, len(stops) - 2)
        frac = (pos - low)[..., None]
        return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)
    return (colormaps["turbo"](heat)[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = ALPHA) -> Image.Image:
    """The heatmap coloured and blended over the image's centre square (the part the model sees), as RGB at the
    image's own resolution up to OVERLAY_MAX_SIDE (never below the heatmap's)."""
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be [H, W], got shape {heatmap.shape}.")
    image = upright_rgb(image)
    side = max(heatmap.shape[0], min(*image.size, OVERLAY_MAX_SIDE))
    square = ImageOps.fit(image, (side, side), Image.Resampling.BILINEAR)
    heat = Image.fromarray(np.clip(heatmap, 0, 1).astype(np.float32)).resize((side, side),
                                                                                         Image.Resampling.BILINEAR)
    colour = Image.fromarray(_colours(np.clip(np.asarray(heat), 0, 1)))
    return Image.blend(square, colour, alpha)
