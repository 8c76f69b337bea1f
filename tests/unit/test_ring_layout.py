"""Which rank holds which tokens, and position-masked attention over segments."""

import random

import pytest
import torch

from ringserve.workers.layout import ShardLayout, positions_of, zigzag_segments
from ringserve.workers.ring import attend_segments, choose_mode


@pytest.mark.parametrize("n,P", [(1, 2), (3, 2), (17, 4), (123, 4), (1000, 8)])
def test_zigzag_covers_every_position_once_and_balances(n, P):
    segs = zigzag_segments(10, n, P)
    pos = torch.cat([positions_of(s) for s in segs])
    assert sorted(pos.tolist()) == list(range(10, 10 + n))
    sizes = [sum(k for _, k in s) for s in segs]
    assert max(sizes) - min(sizes) <= 2
    if n >= 2 * P:  # rank r holds pieces r and 2P-1-r: the last piece is rank 0's
        assert segs[0][-1][0] + segs[0][-1][1] == 10 + n


def test_layout_regions_blocks_owner_and_roundtrip():
    lay = ShardLayout(3, block=4)
    lay.add_zigzag(20)
    lay.add_blocks(5)
    lay.add_blocks(9)  # extends the same round-robin region
    lay.add_zigzag(7)
    assert lay.length == 41
    owners = [lay.owner(p) for p in range(41)]
    for r in range(3):
        assert positions_of(lay.segments(r)).tolist() == [p for p in range(41) if owners[p] == r]
    # round-robin by block of 4 from the rank that held the fewest tokens
    first = owners[20]
    assert owners[20:34] == [(first + (i // 4)) % 3 for i in range(14)]
    assert ShardLayout.from_dict(lay.to_dict()).to_dict() == lay.to_dict()
    with pytest.raises(IndexError):
        lay.owner(41)


def dense_ref(q, qpos, k, v, kpos, scale):
    H, Hkv = q.shape[1], k.shape[1]
    kf, vf = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kf.double()) * scale
    s = s.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0)[..., None])
    return torch.einsum("hqk,khd->qhd", p, vf.double()), lse.T


@pytest.mark.parametrize("seed", range(4))
def test_attend_segments_equals_dense_masked_attention(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)

    def rand_segs(lo, count):
        segs, p = [], lo
        for _ in range(count):
            p += rng.randint(0, 6)
            n = rng.randint(1, 9)
            segs.append((p, n))
            p += n
        return segs

    H, Hkv, D = 4, 2, 16
    q_segs, k_segs = rand_segs(rng.randint(0, 20), 3), rand_segs(0, 5)
    qpos, kpos = positions_of(q_segs), positions_of(k_segs)
    q = torch.randn(len(qpos), H, D, generator=g)
    k, v = torch.randn(len(kpos), Hkv, D, generator=g), torch.randn(len(kpos), Hkv, D, generator=g)
    out, lse = attend_segments(q, q_segs, k, v, k_segs, 0.25)
    ro, rl = dense_ref(q, qpos, k, v, kpos, 0.25)
    assert torch.allclose(out.double(), ro, atol=1e-5)
    seen = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), seen)  # rows with no visible key: lse = -inf, out = 0
    assert torch.allclose(lse.double()[seen], rl[seen], atol=1e-5)
    assert float(out[~seen.all(1)].abs().sum() if (~seen).any() else 0) == 0


def test_choose_mode_decides_on_the_whole_call():
    assert choose_mode(1000, 0) == "ring"  # a create
    assert choose_mode(20, 100_000) == "replicated"  # a question against a long context
    assert choose_mode(50_000, 60_000) == "ring"  # a long append
    # a 2048-token piece of a long create was pass-Q before the engine owned chunking; the whole call is not
    assert choose_mode(2048, 40_000) == "replicated" and choose_mode(1_000_000, 40_000) == "ring"
    assert choose_mode(4097, 10_000_000) == "ring"  # past the cap, whatever the context
    assert choose_mode(100, 1599) == "ring" and choose_mode(100, 1600) == "replicated"  # the 1/16 share

def test_local_counts_agree_with_the_segments():
    rng = random.Random(5)
    for P in (1, 2, 3, 4):
        lay = ShardLayout(P, block=4)
        for _ in range(12):
            if rng.random() < 0.4:
                lay.add_zigzag(rng.randint(1, 50))
            else:
                lay.add_blocks(rng.randint(1, 13))
            assert lay.local_counts() == [sum(n for _, n in lay.segments(r)) for r in range(P)]
        if lay.regions[-1].kind == "blocks":
            lay.truncate(lay.length - 3)
        assert lay.local_counts() == [sum(n for _, n in lay.segments(r)) for r in range(P)]
