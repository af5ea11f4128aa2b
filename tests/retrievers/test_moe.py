"""Mixture-of-experts embedding heads: identity at start, routing by domain, router training, domain batches."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import RagError
from retrievers.moe import EXPERT_IDS, MoEConfig, MoEEncoder, router_loss
from retrievers.training_pairs import DomainBatchSampler
from tests.retrievers.dense_fixtures import build_tiny_st

DOMAINS = ["Animals", "Cities", "Sports"]
TEXTS = ["the lion hunts", "paris is a city", "tennis and golf", "an unknown thing"]


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory) -> Path:
    return build_tiny_st(tmp_path_factory.mktemp("moe") / "tiny-st")


def load_st(st_dir: Path):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(st_dir), device="cpu").eval()


def base_embeddings(st_dir: Path) -> np.ndarray:
    return load_st(st_dir).encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)


@pytest.mark.parametrize("expert_ffn", [False, True])
def test_untrained_moe_embeds_like_the_base_model(st_dir, expert_ffn):
    torch.manual_seed(0)
    moe = MoEEncoder(load_st(st_dir), MoEConfig(DOMAINS, hidden=8, expert_ffn=expert_ffn)).eval()
    base = base_embeddings(st_dir)
    for domains in (None, ["Animals", "Cities", "Sports", None]):
        np.testing.assert_allclose(moe.encode(TEXTS, domains=domains), base, atol=1e-6)


def perturb(moe: MoEEncoder, expert: int) -> None:
    with torch.no_grad():
        moe.experts[expert].dense2.weight.normal_(0, 1.0)


def test_rows_go_to_their_domain_expert_and_unknown_rows_to_the_router(st_dir):
    torch.manual_seed(0)
    moe = MoEEncoder(load_st(st_dir), MoEConfig(DOMAINS, hidden=8)).eval()
    base = base_embeddings(st_dir)
    perturb(moe, 1)  # only the "Cities" expert changes
    out = moe.encode(TEXTS, domains=["Animals", "Cities", "Sports", "Cities"])
    np.testing.assert_allclose(out[[0, 2]], base[[0, 2]], atol=1e-6)
    assert not np.allclose(out[1], base[1], atol=1e-3) and not np.allclose(out[3], base[3], atol=1e-3)
    with torch.no_grad():  # a router sure of "Animals" sends unknown rows to the unchanged expert 0
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    np.testing.assert_allclose(moe.encode(TEXTS), base, atol=1e-5)
    with torch.no_grad():  # ... and one sure of "Cities" to expert 1: same as giving the domain
        moe.router.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    np.testing.assert_allclose(moe.encode(TEXTS), moe.encode(TEXTS, domains=["Cities"] * 4), atol=1e-5)
    # a domain the mixture was not built with counts as unknown
    np.testing.assert_allclose(moe.encode(TEXTS, domains=["Cities", "Nope", None, "Cities"]),
                               moe.encode(TEXTS, domains=["Cities"] * 4), atol=1e-5)


def test_shared_head_is_one_head_for_every_domain(st_dir):
    torch.manual_seed(0)
    moe = MoEEncoder(load_st(st_dir), MoEConfig(DOMAINS, hidden=8, shared_head=True)).eval()
    assert len(moe.experts) == 1
    perturb(moe, 0)
    a = moe.encode(TEXTS, domains=["Animals", "Cities", "Sports", None])
    np.testing.assert_allclose(a, moe.encode(TEXTS, domains=["Sports"] * 4), atol=1e-6)


def test_router_learns_the_domain_label(st_dir):
    torch.manual_seed(0)
    st = load_st(st_dir)
    moe = MoEEncoder(st, MoEConfig(DOMAINS, hidden=8))
    for p in st.parameters():
        p.requires_grad_(False)
    texts = ["lion tiger eagle", "shark wolf horse", "paris london tokyo", "berlin rome cairo",
             "football tennis golf", "boxing rugby hockey"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    feats = st.preprocess(texts)
    opt = torch.optim.Adam(moe.router.parameters(), lr=1e-2)  # a typical adapter learning rate
    losses = []
    for _ in range(60):
        out = moe({**feats, EXPERT_IDS: labels})
        loss, acc = router_loss(out["router_logits"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0] and acc == 1.0
    # the router reads a detached embedding: its loss never reaches the encoder or the heads
    assert all(p.grad is None for p in moe.experts.parameters())


def test_expert_ffn_routes_rows_and_round_trips(st_dir):
    torch.manual_seed(0)
    moe = MoEEncoder(load_st(st_dir), MoEConfig(DOMAINS, hidden=8, expert_ffn=True)).eval()
    base = base_embeddings(st_dir)
    with torch.no_grad():
        moe.ffn.intermediate[2].dense.weight.normal_(0, 1.0)  # only "Sports" gets a different FFN
    out = moe.encode(TEXTS, domains=["Animals", "Cities", "Sports", "Animals"])
    np.testing.assert_allclose(out[[0, 1, 3]], base[[0, 1, 3]], atol=1e-6)
    assert not np.allclose(out[2], base[2], atol=1e-3)
    twin = MoEEncoder(load_st(st_dir), MoEConfig(DOMAINS, hidden=8, expert_ffn=True)).eval()
    twin.load_moe_state_dict(moe.moe_state_dict())
    np.testing.assert_array_equal(twin.encode(TEXTS, domains=["Sports"] * 4), moe.encode(TEXTS, domains=["Sports"] * 4))
    assert not any(k.startswith("st.") for k in moe.moe_state_dict())


def test_domain_batches_are_homogeneous_deterministic_and_cover_an_epoch():
    domains = ["a"] * 10 + ["b"] * 7 + ["c"] * 3 + [None] * 1
    sampler = DomainBatchSampler(domains, batch_size=4, seed=5)
    epoch = [sampler.indices(s) for s in range(sampler.per_epoch)]
    for batch in epoch:
        assert len({domains[i] for i in batch}) == 1 and 2 <= len(batch) <= 4
    covered = Counter(i for b in epoch for i in b)
    assert set(covered.values()) == {1} and len(covered) == 10 + 7 + 3  # the lone None example cannot form a batch
    assert epoch == [DomainBatchSampler(domains, 4, 5).indices(s) for s in range(sampler.per_epoch)]
    assert sampler.indices(sampler.per_epoch) != epoch[0] or sampler.indices(sampler.per_epoch + 1) != epoch[1]


def test_config_errors():
    with pytest.raises(RagError, match="no domains"):
        MoEConfig([])
    with pytest.raises(RagError, match="duplicate"):
        MoEConfig(["a", "a"])
