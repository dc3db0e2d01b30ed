"""Merged models in the layout of their base (:mod:`skillhub.modelfolder`): a tiny ``transformers`` model saved in
safetensors shards, finetuned copies localized and stitched offline by ``skillhub stitch``, and the result loaded by
``from_pretrained`` with exactly the weights the service's stitcher computes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from skillhub.checkpoint import open_checkpoint, write_safetensors
from skillhub.delta import SparseDelta
from skillhub.modelfolder import INDEX_NAME, layout_of, side_files
from skillhub.offline import part_of, stitch_masks, tensor_local
from skillhub.plugins import load_plugins
from skillhub.stitch import Stitcher
from tests.test_cli import assert_ok, run_cli

transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")

SHARD = "20KB"  # a tiny Llama (hidden 32, 2 layers) of ~80 KB in float32: several shards


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def finetuned(model: transformers.PreTrainedModel, seed: int) -> dict[str, torch.Tensor]:
    """θ₀ + small noise everywhere + a larger change on ~3% of each tensor (the skill)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in model.state_dict().items():
        x = t.float()
        noise = torch.randn(x.shape, generator=g) * 1e-4
        skill = (torch.rand(x.shape, generator=g) < 0.03) * torch.randn(x.shape, generator=g) * 0.05
        out[k] = (x + noise + skill).to(t.dtype)
    return out


def write_tokenizer(folder: Path) -> None:
    """A real (word-level) tokenizer's files, as a Hub model folder carries them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "skill"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    dtype = request.param
    d = tmp_path_factory.mktemp(f"llama_{str(dtype).removeprefix('torch.')}")
    base = tiny_llama(0, dtype)
    base.save_pretrained(d / "base", max_shard_size=SHARD, safe_serialization=True)
    write_tokenizer(d / "base")
    masks = []
    for i in (1, 2, 3):
        ft = tiny_llama(0, dtype)
        ft.load_state_dict(finetuned(base, 100 + i))
        ft.save_pretrained(d / f"ft{i}", max_shard_size=SHARD, safe_serialization=True)
        masks.append(d / f"ft{i}.mask.safetensors")
        assert_ok(run_cli(d, "localize", "--base", "base", "--finetuned", f"ft{i}", "--out", masks[-1].name,
                          "--sparsity", "0.05", "--skill", f"skill{i}"))
    assert_ok(run_cli(d, "stitch", "--base", "base", "--out", "out", *[m.name for m in masks]))
    return {"dir": d, "dtype": dtype, "masks": masks, "base": base}


def service_stitch(base_dir: Path, masks: list[Path]) -> dict[str, torch.Tensor]:
    """What the service's stitcher holds for these masks: one Stitcher over every included tensor."""
    base = open_checkpoint(base_dir)
    deltas = [SparseDelta.load(m) for m in masks]
    st = Stitcher({k: base.tensor(k) for k in deltas[0].shapes}, load_plugins().make_policy("average", {}),
                  device="cpu")
    for i, d in enumerate(deltas):
        st.add(f"s{i}", d)
    return st.snapshot()


def test_the_base_is_sharded_and_has_a_tokenizer(world: dict) -> None:
    base = world["dir"] / "base"
    assert (base / INDEX_NAME).is_file() and len(list(base.glob("model-*.safetensors"))) >= 3
    assert {"config.json", "tokenizer.json"} <= {p.name for p in side_files(base)}


def test_the_output_is_the_base_s_layout_with_an_index(world: dict) -> None:
    base, out = world["dir"] / "base", world["dir"] / "out"
    want = json.loads((base / INDEX_NAME).read_text())["weight_map"]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == want  # the same tensors in the same shard files, under the base's names
    ckpt = open_checkpoint(out)
    assert index["metadata"]["total_size"] == sum(ckpt[k].numel * ckpt[k].dtype.itemsize for k in ckpt)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(want.values()))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (base / name).exists():
            assert (out / name).read_bytes() == (base / name).read_bytes(), name


def test_from_pretrained_loads_the_stitched_weights(world: dict) -> None:
    d, dtype = world["dir"], world["dtype"]
    model = transformers.AutoModelForCausalLM.from_pretrained(d / "out", dtype=dtype)
    got = model.state_dict()
    want = service_stitch(d / "base", world["masks"])
    base_sd = world["base"].state_dict()
    changed = 0
    for key, t in got.items():
        expect = want.get(key, base_sd[key])
        assert t.dtype == expect.dtype == dtype, key
        assert torch.equal(t, expect.reshape(t.shape)), key
        changed += int((t != base_sd[key]).sum())
    assert changed > 0  # the skills are in: the test would notice the base written back unchanged
    tok = transformers.AutoTokenizer.from_pretrained(d / "out")
    assert tok("hello world")["input_ids"] == [3, 4]
    encoder = transformers.AutoModel.from_pretrained(d / "out", dtype=dtype)  # the bare model loads too
    assert torch.equal(encoder.state_dict()["embed_tokens.weight"], got["model.embed_tokens.weight"])


def test_the_stitch_is_localize_and_stitch(world: dict) -> None:
    """Independent of the stitcher: θ₀ + Σ γ⊙τ / max(Σ γ, 1) from the mask files, in float64."""
    d = world["dir"]
    out = open_checkpoint(d / "out")
    base = open_checkpoint(d / "base")
    deltas = [SparseDelta.load(m) for m in world["masks"]]
    for key in deltas[0].shapes:
        acc = torch.zeros(math.prod(base[key].shape), dtype=torch.float64)
        cnt = torch.zeros_like(acc)
        for dl in deltas:
            acc += dl.dense(key, torch.float64).reshape(-1)
            cnt += dl.mask(key).reshape(-1).double()
        want = (base.tensor(key).double().reshape(-1) + acc / cnt.clamp(min=1)).to(base[key].dtype)
        assert torch.equal(out.tensor(key).reshape(-1), want), key


def test_a_single_file_base_still_gives_a_single_file(tmp_path: Path) -> None:
    """Today's behaviour for a file base: one safetensors file, normalised keys, the manifest in its header."""
    g = torch.Generator().manual_seed(0)
    base = {"module.a.weight": torch.randn(8, 6, generator=g), "module.b.weight": torch.randn(5, generator=g)}
    write_safetensors(tmp_path / "base.safetensors", base, {})
    ckpt = open_checkpoint(tmp_path / "base.safetensors")
    delta = SparseDelta({"a.weight": torch.tensor([1, 7, 30], dtype=torch.int32)},
                        {"a.weight": torch.tensor([0.5, -1.0, 2.0])}, {"a.weight": (8, 6), "b.weight": (5,)},
                        {"a.weight": torch.float32, "b.weight": torch.float32})
    delta.save(tmp_path / "m.mask.safetensors")
    layout = layout_of(ckpt)
    assert not layout.folder and len(layout.shards) == 1
    stitch_masks(tmp_path / "base.safetensors", [tmp_path / "m.mask.safetensors"], tmp_path / "out.safetensors",
                 policy=load_plugins().make_policy("average", {}), device="cpu")
    out = open_checkpoint(tmp_path / "out.safetensors")
    assert set(out) == {"a.weight", "b.weight"} and out.metadata["format"] == "pt"
    want = base["module.a.weight"].reshape(-1).clone()
    want[[1, 7, 30]] += torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(out.tensor("a.weight").reshape(-1), want)
    assert torch.equal(out.tensor("b.weight"), base["module.b.weight"])


def test_part_of_cuts_a_delta_to_a_piece_of_one_tensor() -> None:
    d = SparseDelta({"a": torch.tensor([0, 2, 5, 6], dtype=torch.int32)}, {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                                                            "b": torch.tensor([0.0, 3.0, 0.0])},
                    {"a": (7,), "b": (3,), "c": (4,)}, {"a": torch.float32, "b": torch.float32, "c": torch.float32})
    a = part_of(d, "a", 2, 6)
    assert a is not None and a.shapes == {"a": (4,)}
    assert a.indices["a"].tolist() == [0, 3] and a.values["a"].tolist() == [2.0, 3.0]
    assert part_of(d, "a", 3, 5) is None
    b = part_of(d, "b", 1, 3)
    assert b is not None and b.is_dense("b") and b.values["b"].tolist() == [3.0, 0.0] and b.nnz == 1
    assert part_of(d, "c", 0, 4) is None


@pytest.mark.parametrize("piece", [1, 7, 1000])
def test_pieces_give_the_same_bytes(world: dict, piece: int, tmp_path: Path) -> None:
    """Stitched in pieces of a few entries (so every tensor crosses piece boundaries): the same bytes."""
    d = world["dir"]
    stitch_masks(d / "base", world["masks"], tmp_path / "out", policy=load_plugins().make_policy("average", {}),
                 device="cpu", piece=piece)
    want, got = open_checkpoint(d / "out"), open_checkpoint(tmp_path / "out")
    for key in want:
        assert torch.equal(got.tensor(key).reshape(-1).view(torch.uint8),
                           want.tensor(key).reshape(-1).view(torch.uint8)), key


@pytest.mark.parametrize(("policy", "params", "local"), [("average", {}, True), ("sum", {"scale": 0.5}, True),
                                                         ("ties", {}, True),
                                                         ("ties", {"zero_sign": "majority"}, False)])
def test_which_policies_stream_tensor_by_tensor(policy: str, params: dict, local: bool) -> None:
    assert tensor_local(load_plugins().make_policy(policy, params)) is local


@pytest.mark.parametrize(("policy", "params"), [("sum", {"scale": 0.7}), ("ties", {}),
                                               ("ties", {"zero_sign": "majority"})])
def test_every_policy_gives_the_service_s_bytes(world: dict, policy: str, params: dict, tmp_path: Path) -> None:
    """Streamed tensor by tensor (or, for a model-wide policy, over every tensor at once): the service's bytes."""
    d = world["dir"]
    pol = load_plugins().make_policy(policy, params)
    stitch_masks(d / "base", world["masks"], tmp_path / "out", policy=pol, device="cpu")
    base = open_checkpoint(d / "base")
    deltas = [SparseDelta.load(m) for m in world["masks"]]
    st = Stitcher({k: base.tensor(k) for k in deltas[0].shapes}, pol, device="cpu")
    for i, dl in enumerate(deltas):
        st.add(f"s{i}", dl)
    out = open_checkpoint(tmp_path / "out")
    for key in base:
        want = st.tensor(key) if key in deltas[0].shapes else base.tensor(key)
        assert torch.equal(out.tensor(key).reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key



def test_the_service_publishes_loadable_model_folders(world: dict, tmp_path: Path) -> None:
    """A Hub whose base is a model folder: every version's ``state/models/<n>/`` is a folder ``from_pretrained``
    loads, ``latest`` points to the newest complete one, and its weights are the offline stitch's, byte for byte."""
    from skillhub.config import load_config
    from skillhub.hub import Hub

    d, dtype = world["dir"], world["dtype"]
    (tmp_path / "config.toml").write_text(
        f'[base]\nfamily = "state_dict"\nweights = "{d / "base"}"\n[state]\ndir = "state"\n'
        '[localize.params]\nsparsity = 0.05\n')
    hub = Hub(load_config(tmp_path / "config.toml", env={}))
    hub.start()
    try:
        for i in (1, 2, 3):
            hub.ingest(d / f"ft{i}", skill=f"skill{i}")
        version = hub.reconcile()
        assert version is not None and sorted(version.manifest["skills"]) == ["skill1", "skill2", "skill3"]
        assert hub.reconciler.publisher.flush()
    finally:
        hub.close()
    models = tmp_path / "state" / "models"
    folder = models / str(version.number)
    assert (models / "latest").is_symlink() and (models / "latest").resolve() == folder.resolve()
    assert json.loads((folder / INDEX_NAME).read_text())["weight_map"] == \
        json.loads((d / "base" / INDEX_NAME).read_text())["weight_map"]
    assert (folder / "config.json").read_bytes() == (d / "base" / "config.json").read_bytes()
    served = transformers.AutoModelForCausalLM.from_pretrained(models / "latest", dtype=dtype).state_dict()
    offline = transformers.AutoModelForCausalLM.from_pretrained(d / "out", dtype=dtype).state_dict()
    assert served.keys() == offline.keys()
    for key in served:
        assert torch.equal(served[key], offline[key]), key
    assert transformers.AutoTokenizer.from_pretrained(models / "latest")("hello")["input_ids"] == [3]
