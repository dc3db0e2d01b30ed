"""Data-driven localization ("trained"): a mask learned on few-shot examples finds a planted skill that top-|τ| misses.

The setup is a tiny seeded MLP (16 → 32 → 4). θ₀ is a random init and fails the task (label = which of the first
four input features is largest, inputs 2 and 3 on a 30× larger scale). The "finetune" θₜ = θ₀ + τ where τ is a
planted skill of 8 entries — for each class c, W1[h_c, c] routes feature c to a hidden unit h_c and W2[c, h_c] routes
that unit to class c — plus dense noise (std 0.1) everywhere else. Six planted entries are large (3.0), but the two
that read the large-scale inputs are small (0.1, about 200 noise entries are larger) and just as important, so top-|τ|
alone cannot find them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs
from torch.func import functional_call

from skillhub.delta import Provenance, SparseDelta
from skillhub.errors import LocalizeError
from skillhub.localize import LocalizeContext, resolve_params, run_localizer
from skillhub.plugins import load_plugins
from skillhub.strategies.dataless import Dataless
from skillhub.strategies.trained import Trained
from skillhub.taskvector import TaskVector

PROV = Provenance(skill="planted", base="b" * 64, source="s" * 64)
HIDDEN = (3, 11, 19, 27)  # h_c, the hidden unit the planted skill uses for class c
SCALES = torch.tensor([1.0, 1.0, 30.0, 30.0] + [1.0] * 12)  # features 2 and 3 on a large scale
BIG, SMALL, NOISE = 3.0, 0.1, 0.1


def mlp() -> torch.nn.Module:
    # On the meta device: the architecture only (functional_call supplies every tensor), no draw from the global RNG.
    return torch.nn.Sequential(torch.nn.Linear(16, 32, device="meta"), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4, device="meta"))


class Objective:
    """A TaskObjective over the MLP: mean cross-entropy (full batch, or a random batch drawn from torch's global
    generator so that the strategy's seed matters) and accuracy over every example."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> None:
        self.net, self.x, self.y, self.batch = mlp(), x, y, batch
        self.size = len(y)
        self.drawn: list[list[int]] = []  # the batches drawn, to check the seeding

    def _logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, {k: v.float() for k, v in params.items()}, (x,))

    def loss(self, params: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        if self.batch is None:
            return torch.nn.functional.cross_entropy(self._logits(params, self.x), self.y)
        i = torch.randperm(self.size)[: self.batch]
        self.drawn.append(i.tolist())
        return torch.nn.functional.cross_entropy(self._logits(params, self.x[i]), self.y[i])

    def accuracy(self, params: Mapping[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return float((self._logits(params, self.x).argmax(1) == self.y).float().mean())


class Setup:
    """θ₀, θₜ = θ₀ + τ (planted skill + noise), the planted coordinates, and 256 labelled examples."""

    def __init__(self, seed: int = 0, half: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        base = {"0.weight": torch.randn(32, 16, generator=g) * 0.1 / SCALES,
                "0.bias": torch.randn(32, generator=g) * 0.1,
                "2.weight": torch.randn(4, 32, generator=g) * 0.1, "2.bias": torch.randn(4, generator=g) * 0.1}
        tau = {k: torch.randn(v.shape, generator=g) * NOISE for k, v in base.items()}
        tau["0.weight"] /= SCALES  # the noise is on the scale of each input, like θ₀
        self.planted = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in base.items()}
        for c, h in enumerate(HIDDEN):
            tau["0.weight"][h, c] = BIG if c < 2 else SMALL
            tau["2.weight"][c, h] = BIG
            self.planted["0.weight"][h, c] = self.planted["2.weight"][c, h] = True
        dtype = torch.float16 if half else torch.float32
        self.base = {k: v.to(dtype) for k, v in base.items()}
        self.ft = {k: (base[k] + tau[k]).to(dtype) for k in base}
        self.x = torch.randn(256, 16, generator=g) * SCALES
        self.y = (self.x[:, :4] / SCALES[:4]).argmax(1)
        self.n_planted = sum(int(p.sum()) for p in self.planted.values())

    def task(self) -> TaskVector:
        return TaskVector.from_state_dicts(self.base, self.ft)

    def objective(self, batch: int | None = None) -> Objective:
        return Objective(self.x, self.y, batch)

    def hits(self, delta: SparseDelta) -> int:
        return sum(int(self.planted[k].reshape(-1)[i.long()].sum()) for k, i in delta.indices.items())

    def grafted(self, delta: SparseDelta) -> dict[str, torch.Tensor]:
        return {k: self.base[k].float() + delta.dense(k) for k in self.base}


def localize(setup: Setup, params: dict | None = None, *, seed: int = 0, batch: int | None = None,
             objective: Objective | None = None,
             progress: Callable[[int, int], None] | None = None) -> SparseDelta:
    obj = objective if objective is not None else setup.objective(batch)
    ctx = LocalizeContext(seed=seed, examples=obj, progress=progress)
    return run_localizer(Trained, setup.task(), params, ctx, PROV)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tensors are tiny: intra-op threads only add contention, which on a loaded machine costs 10× the time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


def test_the_setup_needs_more_than_top_abs_tau(setup: Setup) -> None:
    obj = setup.objective()
    assert setup.n_planted == 8
    assert obj.accuracy(setup.base) < 0.4  # θ₀ fails the task ...
    assert obj.accuracy(setup.ft) > 0.85  # ... the finetune solves it
    planted_only = {k: setup.base[k] + (setup.ft[k] - setup.base[k]) * setup.planted[k] for k in setup.base}
    assert obj.accuracy(planted_only) > 0.85  # and the planted entries alone carry the skill
    # The two small planted entries rank far below the noise by |τ|.
    task = setup.task()
    tau_abs = torch.cat([task.tensor(k).abs().reshape(-1) for k in task.keys])
    planted = torch.cat([setup.planted[k].reshape(-1) for k in task.keys])
    ranks = sorted(tau_abs.argsort(descending=True).argsort()[planted].tolist())
    assert ranks[:6] == list(range(6)) and min(ranks[6:]) > 100


def test_learned_mask_recovers_the_planted_skill(setup: Setup) -> None:
    obj = setup.objective()
    with capture_logs() as logs:
        delta = localize(setup, objective=obj)
    assert setup.hits(delta) / setup.n_planted >= 0.9
    assert delta.nnz < 10 * setup.n_planted
    acc_mask, acc_full = obj.accuracy(setup.grafted(delta)), obj.accuracy(setup.ft)
    assert acc_mask >= acc_full - 0.05
    assert acc_mask > obj.accuracy(setup.base) + 0.4
    # Top-|τ| with as many entries misses the small planted entries that the learned mask found.
    dataless = run_localizer(Dataless, setup.task(), {"sparsity": delta.nnz / delta.numel}, LocalizeContext(), PROV)
    assert dataless.nnz == delta.nnz
    assert setup.hits(dataless) < setup.hits(delta)
    # One log line with the mask size and both accuracies.
    [line] = [e for e in logs if e["event"] == "trained mask"]
    assert line["nnz"] == delta.nnz and line["density"] == pytest.approx(delta.density)
    assert line["accuracy_mask"] == pytest.approx(acc_mask) and line["accuracy_finetuned"] == pytest.approx(acc_full)


def test_deterministic_for_a_seed_and_the_callers_rng_untouched(setup: Setup) -> None:
    runs = []
    for seed in (3, 3, 4):
        obj = setup.objective(batch=64)
        rng = torch.get_rng_state()
        runs.append((localize(setup, seed=seed, objective=obj), obj.drawn))
        assert torch.equal(torch.get_rng_state(), rng)
    (a, drawn_a), (b, drawn_b), (_, drawn_c) = runs
    assert a.indices.keys() == b.indices.keys()
    for key in a.indices:
        assert torch.equal(a.indices[key], b.indices[key]) and torch.equal(a.values[key], b.values[key]), key
    assert drawn_a == drawn_b and len(drawn_a) == 100
    assert drawn_c != drawn_a  # another seed, other batches (the masks may or may not differ)
    # The params' seed overrides the context's.
    obj = setup.objective(batch=64)
    localize(setup, {"seed": 3}, seed=0, objective=obj)
    assert obj.drawn == drawn_a


def test_the_l1_penalty_shrinks_the_mask(setup: Setup) -> None:
    sizes = [localize(setup, {"l1": l1}).nnz for l1 in (0.0, 0.1, 1.0, 10.0)]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[0] > 10 * setup.n_planted  # without the penalty, much of the helpful-looking noise gets in


def test_target_sparsity_caps_the_mask(setup: Setup) -> None:
    free = localize(setup, {"l1": 0.0})
    k = math.floor(0.02 * free.numel)
    assert free.nnz > k
    capped = localize(setup, {"l1": 0.0, "target_sparsity": 0.02})
    assert capped.nnz == k
    for key, idx in capped.indices.items():  # the kept entries are among the uncapped mask's
        assert bool(torch.isin(idx, free.indices[key]).all()), key
    # A cap above the mask size changes nothing; a cap below one entry leaves an empty mask.
    loose = localize(setup, {"l1": 0.0, "target_sparsity": 0.9})
    assert {k: v.tolist() for k, v in loose.indices.items()} == {k: v.tolist() for k, v in free.indices.items()}
    assert localize(setup, {"l1": 0.0, "target_sparsity": 1e-4}).nnz == 0


def test_missing_or_empty_examples_are_errors(setup: Setup) -> None:
    with pytest.raises(LocalizeError, match="needs few-shot examples"):
        run_localizer(Trained, setup.task(), None, LocalizeContext(), PROV)
    empty = setup.objective()
    empty.size = 0
    with pytest.raises(LocalizeError, match="'trained'.*no examples") as err:
        localize(setup, objective=empty)
    assert err.value.hint and "dataless" in err.value.hint
    with pytest.raises(LocalizeError, match="no examples"):  # called directly, without run_localizer's check
        Trained().localize(setup.task(), Trained.Params(), LocalizeContext())


def test_non_finite_loss_is_an_error(setup: Setup) -> None:
    class Diverging(Objective):
        def loss(self, params: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
            out = super().loss(params, step)
            return out * float("nan") if step == 2 else out

    with pytest.raises(LocalizeError, match="'trained'.*non-finite.*step 3") as err:
        localize(setup, objective=Diverging(setup.x, setup.y))
    assert err.value.hint and "lr" in err.value.hint


@pytest.mark.parametrize(("raw", "field"), [
    ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"lr": -0.1}, "lr"), ({"l1": -1.0}, "l1"),
    ({"optimizer": "rmsprop"}, "optimizer"), ({"init_sparsity": 0.0}, "init_sparsity"),
    ({"init_sparsity": 1.5}, "init_sparsity"), ({"init_logit": 0.0}, "init_logit"),
    ({"target_sparsity": 0.0}, "target_sparsity"), ({"target_sparsity": 2.0}, "target_sparsity"),
    ({"sparsity": 0.01}, "sparsity"),
])
def test_invalid_params_name_the_field(setup: Setup, raw: dict, field: str) -> None:
    with pytest.raises(LocalizeError) as err:
        resolve_params(Trained, raw)
    assert err.value.key == field and field in str(err.value)
    with pytest.raises(LocalizeError) as err:
        localize(setup, raw)
    assert err.value.key == field


def test_default_params() -> None:
    assert resolve_params(Trained, None).model_dump() == {
        "steps": 100, "lr": 0.1, "optimizer": "adam", "l1": 1.0, "init_sparsity": 0.01, "init_logit": 5.0,
        "target_sparsity": None, "seed": None}


def test_result_passes_skillhubs_checks(setup: Setup, tmp_path: Path) -> None:
    steps: list[tuple[int, int]] = []
    delta = localize(setup, {"steps": 30}, progress=lambda done, total: steps.append((done, total)))
    assert steps == [(i, 30) for i in range(1, 31)]
    assert delta.provenance == Provenance(skill="planted", base="b" * 64, source="s" * 64, strategy="trained",
                                          params=Trained.Params(steps=30).model_dump(mode="json"))
    task = setup.task()
    assert delta.shapes == task.shapes and delta.dtypes == task.dtypes
    assert delta.nnz > 0
    for key, idx in delta.indices.items():
        assert idx.dtype == torch.int32 and bool((idx[1:] > idx[:-1]).all()), key
        assert torch.equal(delta.values[key], task.tensor(key).reshape(-1)[idx.long()]), key
    path = tmp_path / "planted.mask.safetensors"
    delta.save(path)
    loaded = SparseDelta.load(path)
    assert loaded.provenance == delta.provenance
    assert all(torch.equal(loaded.indices[k], delta.indices[k]) for k in delta.indices)


def test_half_precision_base_keeps_its_dtype() -> None:
    setup = Setup(half=True)
    delta = localize(setup)
    task = setup.task()
    assert setup.hits(delta) / setup.n_planted >= 0.9
    for key, vals in delta.values.items():
        assert vals.dtype == torch.float16, key
        assert torch.equal(vals, task.tensor(key).reshape(-1)[delta.indices[key].long()].half()), key


def test_plain_gradient_descent_is_available(setup: Setup) -> None:
    # SGD's lr is in raw gradient units: σ′(−5) ≈ 0.007 makes the reference's huge step sizes necessary.
    delta = localize(setup, {"optimizer": "sgd", "lr": 300.0})
    assert setup.hits(delta) / setup.n_planted >= 0.9
    assert delta.nnz < 10 * setup.n_planted


def test_registered_as_a_default_plugin() -> None:
    plugins = load_plugins([])
    assert plugins.localizer("trained") is Trained
    assert plugins.origins[("localization strategy", "trained")] == "skillhub.strategies.trained"
    assert Trained.needs_examples
