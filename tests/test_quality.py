"""Scoring a skill on its examples: the fit/check split is deterministic and per class, re-centring puts each class's
row on its examples' mean, accuracy is top-1 on the check part."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from skillhub.families import Examples, Runtime
from skillhub.head import Head
from skillhub.quality import accuracy, embed, mean_accuracy, recentre, score, split


def examples(n_per_class: tuple[int, ...], seed: int = 0) -> Examples:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    return Examples(torch.randint(0, 256, (len(labels), 3, 4, 4), generator=g, dtype=torch.uint8), labels)


def test_split_is_per_class_deterministic_and_disjoint() -> None:
    ex = examples((8, 5, 2))
    a, b = split(ex), split(ex)
    assert torch.equal(a.check.labels, b.check.labels) and torch.equal(a.fit.images, b.fit.images)
    # every 4th example of each class, in the order given, is held out: 8 -> 2, 5 -> 1, 2 -> 0
    assert sorted(a.check.labels.tolist()) == [0, 0, 1]
    assert len(a.fit.labels) + len(a.check.labels) == len(ex.labels)
    images = {tuple(x.flatten().tolist()) for x in ex.images}
    fit = {tuple(x.flatten().tolist()) for x in a.fit.images}
    check = {tuple(x.flatten().tolist()) for x in a.check.images}
    assert fit | check == images and not fit & check
    positions = (ex.labels == 0).nonzero().flatten()  # class 0's 4th and 8th examples are its check examples
    want = ex.images[positions[[3, 7]]]
    assert torch.equal(a.check.images[a.check.labels == 0], want)


def test_recentre_puts_each_class_on_its_mean_and_keeps_the_rest() -> None:
    head = Head(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1), torch.zeros(3), ["a", "b", "c"], 7.0)
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])  # no example of class 2
    new = recentre(head, emb, labels)
    torch.testing.assert_close(new.weight[0], torch.nn.functional.normalize(emb[labels == 0].mean(0), dim=0))
    torch.testing.assert_close(new.weight[1], torch.nn.functional.normalize(emb[labels == 1].mean(0), dim=0))
    assert torch.equal(new.weight[2], head.weight[2])
    assert new.classes == head.classes and new.scale == 7.0 and new.bias is head.bias


def test_accuracy_and_mean() -> None:
    head = Head(torch.eye(3), None, ["a", "b", "c"], 1.0)
    emb = torch.eye(3)[[0, 1, 2, 0]]
    assert accuracy(head, emb, torch.tensor([0, 1, 2, 1])) == 0.75
    assert accuracy(head, emb[:0], torch.tensor([], dtype=torch.long)) is None
    assert mean_accuracy([0.5, None, 1.0]) == 0.75 and mean_accuracy([None]) is None


class MeanColour(Runtime):
    """Embeds an image as its normalised mean colour plus a learnt offset: a model whose weights matter."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.w = tensors["w"].clone()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(batch.mean((2, 3)) @ self.w, dim=-1)

    def tensors(self) -> Mapping[str, torch.Tensor]:
        return {"w": self.w}


def test_score_refits_on_the_models_features_and_checks_on_held_out_examples() -> None:
    # two classes: reddish and bluish images; a head whose rows point the wrong way scores 0, re-centred it is right
    g = torch.Generator().manual_seed(1)
    red = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    red[:, 0] = torch.randint(150, 255, (8, 4, 4), generator=g, dtype=torch.uint8)
    blue = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    blue[:, 2] = torch.randint(150, 255, (8, 4, 4), generator=g, dtype=torch.uint8)
    ex = split(Examples(torch.cat([red, blue]), torch.tensor([0] * 8 + [1] * 8)))
    rt = MeanColour({"w": torch.eye(3)})
    wrong = Head(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), None, ["red", "blue"], 10.0)
    assert score(rt, wrong, ex, refit=False).accuracy == 0.0
    fitted = score(rt, wrong, ex)
    assert fitted.accuracy == 1.0 and fitted.head.weight[0].argmax() == 0 and fitted.head.weight[1].argmax() == 2
    assert embed(rt, ex.check.images).shape == (4, 3)
