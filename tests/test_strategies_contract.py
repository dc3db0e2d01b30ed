"""Contract tests over EVERY registered localization strategy and stitch policy: the built-ins, the repo's
``plugins/`` folder (``dare``), and whatever is added later, each with its default params.

A strategy's result must fit its task vector (known keys, sorted unique in-range int32 indices, finite values in the
base dtype, every included tensor described), be deterministic, carry its provenance, and survive a mask file
round trip. A stitch policy must return exactly θ₀ once every delta is removed again, leave entries that no mask
covers at exactly θ₀, and agree with a from-scratch stitch of the active set after any adds and removes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from skillhub import LocalizeContext, Provenance, SparseDelta, Stitcher, TaskVector
from skillhub.localize import Localizer, run_localizer
from skillhub.plugins import load_plugins
from skillhub.stitch import StitchPolicy, stitch

REPO_PLUGINS = Path(__file__).parent.parent / "plugins"
PLUGINS = load_plugins([REPO_PLUGINS], entry_points=False)
LOCALIZERS = sorted(PLUGINS.localizers)
POLICIES = sorted(PLUGINS.policies)

# Different ranks and sizes, a 0-d tensor, a half-precision tensor, and an integer buffer that must be left out.
SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.weight": (24, 16),
    "blocks.0.attn.bias": (24,),
    "blocks.1.conv.weight": (4, 3, 3, 3),
    "logit_scale": (),
    "norm.weight": (40,),
}
HALF = "norm.weight"
INT_KEY = "norm.num_batches_tracked"


def synthetic_task(seed: int = 0) -> tuple[TaskVector, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A seeded base and finetune: τ of varied magnitudes, with some entries exactly zero (untouched weights)."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    ft: dict[str, torch.Tensor] = {}
    for i, (key, shape) in enumerate(SHAPES.items()):
        b = torch.randn(shape, generator=g)
        tau = torch.randn(shape, generator=g) * (0.01 * (i + 1))
        tau = torch.where(torch.rand(shape, generator=g) < 0.2, torch.zeros_like(tau), tau)
        dtype = torch.float16 if key == HALF else torch.float32
        base[key], ft[key] = b.to(dtype), (b + tau).to(dtype)
    base[INT_KEY] = torch.tensor(7)
    ft[INT_KEY] = torch.tensor(9)
    return TaskVector.from_state_dicts(base, ft), base, ft


class ReachTheFinetune:
    """A trivial :class:`~skillhub.localize.TaskObjective` for data-driven strategies: the loss is the mean squared
    distance (summed) of the included tensors to the finetune's, so every strategy that needs examples runs the contract."""

    size = 8

    def __init__(self, task: TaskVector) -> None:
        self.target = {k: task.base.tensor(k).float() + task.tensor(k) for k in task.keys}

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        # Summed (not averaged) and scaled, so the fit outweighs the default L1 penalty on this tiny model.
        return 1000 * sum(((params[k] - self.target[k].to(params[k].device)) ** 2).sum() for k in params)  # type: ignore

    def accuracy(self, params: dict[str, torch.Tensor]) -> float:
        return 0.0


def localizer(name: str) -> type[Localizer]:
    return PLUGINS.localizer(name)


def run(name: str, task: TaskVector, seed: int = 0) -> SparseDelta:
    prov = Provenance(skill="contract", base="b" * 64, source="s" * 64)
    cls = localizer(name)
    examples = ReachTheFinetune(task) if cls.needs_examples else None
    return run_localizer(cls, task, None, LocalizeContext(seed=seed, examples=examples), prov)


def assert_same_delta(a: SparseDelta, b: SparseDelta) -> None:
    """Same mask and values per tensor; the same arrays too wherever both hold a tensor in the same form (a mask file
    stores a tensor densely when that is smaller, so a round trip may change the form, never the content)."""
    assert a.values.keys() == b.values.keys()
    for key in a.values:
        assert a.values[key].dtype == b.values[key].dtype
        assert torch.equal(a.mask(key), b.mask(key)), key
        assert torch.equal(a.dense(key, a.values[key].dtype), b.dense(key, b.values[key].dtype)), key
        if key in a.indices and key in b.indices:
            assert a.indices[key].dtype == b.indices[key].dtype
            assert torch.equal(a.indices[key], b.indices[key]), key
            assert torch.equal(a.values[key], b.values[key]), key
    assert a.shapes == b.shapes
    assert a.dtypes == b.dtypes
    assert a.provenance == b.provenance


def test_the_suite_sees_the_builtin_and_repo_plugins() -> None:
    assert {"dataless", "dare"} <= set(LOCALIZERS)
    assert {"average", "sum", "ties"} <= set(POLICIES)


# --- localization strategies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOCALIZERS)
def test_strategy_result_fits_the_task_vector(name: str) -> None:
    task, base, _ = synthetic_task()
    delta = run(name, task)
    assert INT_KEY not in task.keys
    assert set(delta.values) <= set(task.keys)  # only known keys
    assert set(delta.indices) <= set(delta.values)
    for key in delta.dense_keys:  # the dense form: one finite value per entry, 0 outside the mask
        assert delta.values[key].shape == (math.prod(SHAPES[key]),), key
        assert delta.values[key].dtype == base[key].dtype and bool(torch.isfinite(delta.values[key]).all()), key
        assert delta.nnz_of(key) > 0, key
    # Every included tensor is described, mask empty or not, with the base's shape and dtype.
    assert delta.shapes == {k: tuple(SHAPES[k]) for k in task.keys}
    assert delta.dtypes == {k: base[k].dtype for k in task.keys}
    for key, idx in delta.indices.items():
        numel = math.prod(SHAPES[key])
        assert idx.dtype == torch.int32, key
        assert idx.ndim == 1 and idx.numel() > 0, key  # empty masks are left out, not stored empty
        assert int(idx[0]) >= 0 and int(idx[-1]) < numel, key
        assert bool((idx[1:] > idx[:-1]).all()), f"{key}: indices not strictly increasing"
        vals = delta.values[key]
        assert vals.shape == idx.shape, key
        assert vals.dtype == base[key].dtype, key
        assert bool(torch.isfinite(vals).all()), key
    assert 0 < delta.nnz <= task.numel


@pytest.mark.parametrize("params", [None, {"sparsity": 1.0}, {"sparsity": 0.3, "scope": "tensor"}])
def test_dataless_values_are_exactly_tau(params: dict | None) -> None:
    task, _, _ = synthetic_task()
    delta = run_localizer(localizer("dataless"), task, params, LocalizeContext(), Provenance())
    for key in delta.values:
        idx = delta.flat_indices(key).long()
        tau = task.tensor(key).reshape(-1)[idx]
        assert torch.equal(delta.dense(key, task.dtypes[key]).reshape(-1)[idx], tau.to(task.dtypes[key])), key
        assert bool((tau != 0).all()), key
    if params == {"sparsity": 1.0}:  # every non-zero entry, the large tensors in the dense form
        assert delta.nnz == sum(int((task.tensor(k) != 0).sum()) for k in task.keys) and delta.dense_keys


@pytest.mark.parametrize("name", LOCALIZERS)
def test_strategy_is_deterministic(name: str) -> None:
    task, _, _ = synthetic_task(1)
    assert_same_delta(run(name, task, seed=5), run(name, task, seed=5))
    # A freshly built task vector over the same tensors gives the same result too (no hidden state).
    assert_same_delta(run(name, task, seed=5), run(name, synthetic_task(1)[0], seed=5))


@pytest.mark.parametrize("name", LOCALIZERS)
def test_strategy_provenance_is_stamped(name: str) -> None:
    task, _, _ = synthetic_task()
    delta = run(name, task)
    cls = PLUGINS.localizer(name)
    assert delta.provenance.strategy == name
    assert delta.provenance.params == cls.Params().model_dump(mode="json")
    assert (delta.provenance.skill, delta.provenance.base, delta.provenance.source) == \
        ("contract", "b" * 64, "s" * 64)


@pytest.mark.parametrize("name", LOCALIZERS)
def test_strategy_result_round_trips_through_a_mask_file(name: str, tmp_path: Path) -> None:
    task, _, _ = synthetic_task(2)
    delta = run(name, task)
    path = tmp_path / f"{name}.mask.safetensors"
    sha = delta.save(path)
    assert len(sha) == 64
    assert_same_delta(SparseDelta.load(path), delta)
    assert delta.save(tmp_path / "again.mask.safetensors") == sha  # same mask, same content address


@pytest.mark.parametrize("name", LOCALIZERS)
def test_strategy_params_have_defaults_and_are_frozen(name: str) -> None:
    params_cls = PLUGINS.localizer(name).Params
    assert params_cls.model_config.get("extra") == "forbid"
    assert params_cls.model_config.get("frozen") is True
    params_cls()  # every field has a default


@pytest.mark.parametrize("name", LOCALIZERS)
def test_strategy_result_stitches(name: str) -> None:
    # What a strategy returns is accepted by the stitcher, and removing it restores θ₀.
    task, base, _ = synthetic_task(3)
    delta = run(name, task)
    included = {k: base[k] for k in task.keys}
    s = Stitcher(included, PLUGINS.make_policy("average"), device="cpu")
    s.add("t", delta)
    s.remove("t")
    for key, b in included.items():
        assert torch.equal(s.tensor(key), b), key


# --- stitch policies ------------------------------------------------------------------------------------------------

POLICY_SHAPES: dict[str, tuple[int, ...]] = {"a": (9, 7), "b": (13,), "c": (2, 3, 4), "d": ()}


def policy_base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in POLICY_SHAPES.items()}


def random_delta(seed: int, density: float = 0.35) -> SparseDelta:
    """A random delta over POLICY_SHAPES: values of both signs and varied magnitude, some exactly equal; for odd
    seeds the tensors "a" and "d" in the dense form (values for every entry, 0 outside the mask, no indices)."""
    g = torch.Generator().manual_seed(seed)
    idx: dict[str, torch.Tensor] = {}
    val: dict[str, torch.Tensor] = {}
    for key, shape in POLICY_SHAPES.items():
        keep = (torch.rand(math.prod(shape), generator=g) < density).nonzero().reshape(-1)
        if keep.numel():
            v = torch.randn(keep.numel(), generator=g) * 10 ** torch.randint(-3, 2, (keep.numel(),), generator=g)
            v[: keep.numel() // 4] = 0.5  # shared values make ties for sign-based policies
            if seed % 2 and key in ("a", "d"):
                val[key] = torch.zeros(math.prod(shape)).index_put_((keep,), v)
                continue
            idx[key], val[key] = keep.to(torch.int32), v
    return SparseDelta(idx, val, dict(POLICY_SHAPES), {k: torch.float32 for k in POLICY_SHAPES},
                       Provenance(skill=f"skill{seed}"))


def covered(deltas: list[SparseDelta], key: str) -> torch.Tensor:
    mask = torch.zeros(POLICY_SHAPES[key], dtype=torch.bool)
    for d in deltas:
        mask |= d.mask(key)
    return mask


@pytest.mark.parametrize("accumulate", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", POLICIES)
def test_policy_add_then_remove_everything_is_exactly_theta0(name: str, accumulate: torch.dtype) -> None:
    base = policy_base()
    deltas = [random_delta(seed) for seed in range(6)]
    s = Stitcher(base, PLUGINS.make_policy(name), device="cpu", accumulate=accumulate)
    for i, d in enumerate(deltas):
        s.add(f"t{i}", d)
    for i in (3, 0, 5, 1, 4, 2):  # not the order they were added in
        s.remove(f"t{i}")
    assert s.active == []
    for key, b in base.items():
        assert torch.equal(s.tensor(key), b), key
        assert int(s.count(key).abs().sum()) == 0
    # And again, with the accumulators re-used: still exact.
    for i, d in enumerate(deltas[:3]):
        s.add(f"u{i}", d)
    for i in range(3):
        s.remove(f"u{i}")
    for key, b in base.items():
        assert torch.equal(s.tensor(key), b), key


@pytest.mark.parametrize("name", POLICIES)
def test_policy_leaves_uncovered_entries_at_theta0(name: str) -> None:
    base = policy_base(1)
    deltas = [random_delta(seed, density=0.2) for seed in range(10, 13)]
    s = Stitcher(base, PLUGINS.make_policy(name), device="cpu")
    for i, d in enumerate(deltas):
        s.add(f"t{i}", d)
    for key, b in base.items():
        free = ~covered(deltas, key)
        assert torch.equal(s.tensor(key)[free], b[free]), key
        assert bool(torch.isfinite(s.tensor(key)).all()), key
    assert any(bool((~covered(deltas, k)).any()) for k in base)  # the check above was not vacuous
    # After removing one skill, what only it covered is θ₀ again.
    s.remove("t1")
    rest = [deltas[0], deltas[2]]
    for key, b in base.items():
        free = ~covered(rest, key)
        assert torch.equal(s.tensor(key)[free], b[free]), key


@pytest.mark.parametrize("name", POLICIES)
def test_policy_incremental_equals_stitch_from_scratch(name: str) -> None:
    base = policy_base(2)
    deltas = {f"t{i}": random_delta(20 + i, density=0.5) for i in range(5)}
    policy = PLUGINS.make_policy(name)
    s = Stitcher(base, policy, device="cpu")
    for tid in ("t0", "t1", "t2", "t3"):
        s.add(tid, deltas[tid])
    s.remove("t1")
    s.add("t4", deltas["t4"])
    s.remove("t0")
    active = {tid: deltas[tid] for tid in s.active}
    assert set(active) == {"t2", "t3", "t4"}
    expected = stitch(base, active, PLUGINS.make_policy(name))
    for key in base:
        assert torch.allclose(s.tensor(key), expected[key], rtol=1e-6, atol=1e-6), key


@pytest.mark.parametrize("name", POLICIES)
def test_policy_default_params_and_class(name: str) -> None:
    cls = PLUGINS.policy(name)
    assert issubclass(cls, StitchPolicy) and cls.name == name
    policy = PLUGINS.make_policy(name)
    assert policy.params == cls.Params()
