"""BatchNorm statistics re-estimated on example images (the ``recalibrate_statistics`` hook): the population
statistics of what each layer sees, deterministic, and the model left exactly as it was; open_clip's hook answers
for its own family only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_open_clip import TINY

from skillhub.families.normstats import batchnorm_statistics
from skillhub.families.open_clip import ClipRuntime, create_clip, recalibrate_statistics
from skillhub.plugins import load_plugins

#: open_clip's ModifiedResNet (the RN50 design) at toy size: a CNN tower with BatchNorm layers
TINY_RN = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
           "text_cfg": TINY["text_cfg"]}


def conv_bn(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5))
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def test_one_batch_gives_the_population_mean_and_unbiased_variance() -> None:
    model = conv_bn()
    x = images(8)
    stats = batchnorm_statistics(model, x, model, prefix="m.")
    assert set(stats) == {"m.1.running_mean", "m.1.running_var"}
    with torch.no_grad():
        z = model[0](x)  # what the BatchNorm layer sees
    torch.testing.assert_close(stats["m.1.running_mean"], z.mean((0, 2, 3)))
    torch.testing.assert_close(stats["m.1.running_var"], z.var((0, 2, 3), unbiased=True))


def test_several_batches_average_the_batch_statistics_and_are_deterministic() -> None:
    model = conv_bn()
    x = images(10)
    a = batchnorm_statistics(model, x, model, batch=4)
    b = batchnorm_statistics(model, x, model, batch=4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # 10 images in batches of at most 4: three equal-ish parts (4, 3, 3) of a seeded order, equally weighted
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parts = [model[0](x[p]) for p in torch.tensor_split(order, 3)]
    torch.testing.assert_close(a["1.running_mean"], torch.stack([z.mean((0, 2, 3)) for z in parts]).mean(0))
    torch.testing.assert_close(a["1.running_var"], torch.stack([z.var((0, 2, 3)) for z in parts]).mean(0))
    # the order of the images matters only through the seeded interleaving, which is a function of N alone
    assert not torch.equal(a["1.running_mean"], batchnorm_statistics(model, x.flip(0), model, batch=4)["1.running_mean"])


def test_the_model_is_left_exactly_as_it_was() -> None:
    model = conv_bn()
    model[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = model[1].momentum
    stats = batchnorm_statistics(model, images(6), model)
    assert not torch.equal(stats["1.running_mean"], before["1.running_mean"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules()) and model[1].momentum == momentum
    # dropout stayed in eval while the statistics were gathered: the forward saw no dropped units
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append(m.training))
    batchnorm_statistics(model, images(6), model)
    assert seen == [False]


def test_nothing_to_recalibrate() -> None:
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)).eval()
    assert batchnorm_statistics(plain, images(8), plain) == {}
    model = conv_bn()
    assert batchnorm_statistics(model, images(1), model) == {}  # one image has no variance
    assert batchnorm_statistics(model, images(0), model) == {}


@pytest.fixture
def clip_rn(tmp_path: Path) -> ClipRuntime:
    cfg = tmp_path / "tiny-rn.json"
    cfg.write_text(json.dumps(TINY_RN))
    torch.manual_seed(0)
    return ClipRuntime(create_clip(str(cfg)).eval())


def test_open_clip_re_estimates_the_tower_batchnorm_layers(clip_rn: ClipRuntime) -> None:
    rt = clip_rn
    x = torch.randint(0, 256, (12, 3, 20, 20), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    before = {k: v.clone() for k, v in rt.tensors().items()}
    stats = recalibrate_statistics("open_clip", rt, x)
    assert stats is not None
    live = rt.tensors()
    want = {k for k in live if k.startswith("visual.") and k.endswith(("running_mean", "running_var"))}
    assert set(stats) == want and want
    assert all(stats[k].shape == live[k].shape and stats[k].dtype == live[k].dtype for k in stats)
    assert all(torch.equal(before[k], v) for k, v in rt.tensors().items())  # the runtime is untouched
    assert any(not torch.equal(stats[k], before[k]) for k in stats)
    # the same as the family's building block on the normalised images
    direct = batchnorm_statistics(rt.model, x, lambda b: rt.model.encode_image(rt.normalise(b)))
    assert all(torch.equal(direct[k], stats[k]) for k in stats)


def test_open_clip_answers_for_its_family_only_and_a_vit_has_nothing(clip_rn: ClipRuntime, tmp_path: Path) -> None:
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert recalibrate_statistics("state_dict", clip_rn, x) is None
    cfg = tmp_path / "tiny-vit.json"
    cfg.write_text(json.dumps(TINY))
    vit = ClipRuntime(create_clip(str(cfg)).eval())
    assert recalibrate_statistics("open_clip", vit, x) == {}  # LayerNorm keeps no statistics
    # through the plugin manager, as the service calls it: the built-in open_clip plugin answers
    hook = load_plugins([]).manager.hook.recalibrate_statistics
    assert set(hook(family="open_clip", runtime=clip_rn, images=x)) == set(recalibrate_statistics("open_clip",
                                                                                                    clip_rn, x))
    assert hook(family="state_dict", runtime=clip_rn, images=x) is None
