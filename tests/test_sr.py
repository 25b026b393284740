import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridep.migration.sr import ErrorFeedback, SRCodec, SRSettings, index_bytes, measure_codec_expert_s


@settings(max_examples=60)
@given(st.integers(1, 4), st.integers(8, 300), st.sampled_from([2.0, 5.0, 50.0]),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 10**6))
def test_round_trip_error_is_bounded_by_the_largest_dropped_residual(n, p, ratio, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(p, generator=g, dtype=dtype)
    experts = shared + 0.1 * torch.randn(n, p, generator=g, dtype=dtype)
    codec = SRCodec(ratio, p, dtype)
    buf = codec.encode(experts, shared)
    assert buf.numel() == codec.encoded_bytes(n)
    # at least one entry is always kept, so tiny experts may exceed the budget
    assert codec.encoded_bytes(n) <= n * p * codec.value_bytes / ratio + 1e-9 or codec.k in (None, 1)
    out = codec.decode(buf, n, shared)
    residual = (experts - shared).abs()
    err = (out - experts).abs()
    if codec.k is None:
        assert torch.equal(out, experts)
    else:
        kth = residual.sort(dim=1, descending=True).values[:, codec.k - 1:codec.k]
        assert (err <= kth + 1e-12).all()          # everything dropped is no larger than what is kept
        assert ((err == 0).sum(dim=1) >= codec.k).all()


def test_ratio_one_is_exactly_dense():
    x = torch.randn(3, 40)
    codec = SRCodec(1.0, 40, torch.float32)
    assert codec.k is None and torch.equal(codec.decode(codec.encode(x, x.mean(0)), 3, x.mean(0)), x)


def test_bytes_at_ratio_50_count_indices():
    codec = SRCodec(50.0, 10_000, torch.float32)
    assert index_bytes(10_000) == 2 and index_bytes(1 << 16) == 2 and index_bytes((1 << 16) + 1) == 4
    assert codec.k == 10_000 * 4 // (50 * (4 + 2))
    assert 10_000 * 4 / codec.encoded_bytes(1) == pytest.approx(50.0, rel=0.01)
    half = SRCodec(50.0, 10_000, torch.float32, torch.float16)  # 16-bit values: twice the entries of int32+fp32
    assert half.k == 10_000 * 4 // (50 * (2 + 2)) == 2 * (10_000 * 4 // (50 * (4 + 4)))
    assert 10_000 * 4 / half.encoded_bytes(1) == pytest.approx(50.0, rel=0.01)
    big = SRCodec(50.0, 70_000, torch.float32)  # indices past 65 535 need 4 bytes
    assert big.k == 70_000 * 4 // (50 * (4 + 4))


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [300, 70_000])
def test_16_bit_values_round_trip_within_their_rounding(value_dtype, p):
    g = torch.Generator().manual_seed(p)
    shared = torch.randn(p, generator=g)
    experts = shared + 0.1 * torch.randn(2, p, generator=g)
    codec = SRCodec(10.0, p, torch.float32, value_dtype)
    buf = codec.encode(experts, shared)
    assert buf.numel() == codec.encoded_bytes(2) <= 2 * p * 4 / 10
    out = codec.decode(buf, 2, shared)
    residual = experts - shared
    kth = residual.abs().sort(dim=1, descending=True).values[:, codec.k - 1:codec.k]
    eps = torch.finfo(value_dtype).eps
    # dropped entries err by at most the k-th residual, kept ones by the 16-bit rounding of their value
    assert ((out - experts).abs() <= torch.maximum(kth, residual.abs() * eps) + 1e-6).all()
    kept = (out != shared).sum(dim=1)
    assert (kept <= codec.k).all() and (kept >= codec.k - 2).all()  # (a kept value may round to 0)


@pytest.mark.parametrize("sizes", [(2, 2), (1, 2), (2, 1)])
def test_sr_in_the_runtime(sizes):
    import workers

    from hybridep.launch import run_local

    res = run_local(workers.sr_checks, 4, (sizes,), timeout_s=240)
    for r in res:
        assert r["cr1_identical"], r
        assert r["finite_cr50"]
    # rank 0 has no tokens of its own: its experts learn only from remote ranks' tokens
    assert res[0]["owner_grad_cr50"] and res[0]["owner_changed_cr50"]
    none, cr50 = res[0]["ag_total"]
    assert none / cr50 >= 20.0, (none, cr50)
    for r in res:
        pe = r["per_expert"]
        assert pe["same"], pe
        assert pe["alive_after_forward"] == 0 and pe["decoded_total"] == 2 * pe["decoded_forward"], pe
    assert sum(r["per_expert"]["decoded_forward"] for r in res) > 0
    for r in res:  # compressed gradient return (top-k with error feedback over the DC level)
        gr = r["grads"]
        assert gr["cr1_identical"] and gr["per_owner_err"] <= 1e-12, gr
        dense_rs, topk_rs = gr["rs_bytes"]
        if sizes[0] == 1:  # the domain stays inside a DC: nothing compressed
            assert gr["compressed"] == [] and gr["equal_to_dense"] and dense_rs == topk_rs, gr
        else:
            assert gr["compressed"] == [0] and not gr["equal_to_dense"], gr
            assert dense_rs["dc"] / topk_rs["dc"] >= 20.0 and dense_rs.get("gpu") == topk_rs.get("gpu"), gr
    assert res[0]["grads"]["owner_grad"]  # rank 0 routed no tokens: its gradient came from the others
    for r in res:
        assert r["delta_exact"]
        first, second = r["delta_bytes"]
        assert first == r["ag_bytes_none"] and (second == 0 or first / second >= 20.0)


def test_codec_time_is_measured_per_expert():
    small = measure_codec_expert_s(SRCodec(50.0, 1_000, torch.float32, torch.float16), 2, reps=3)
    big = measure_codec_expert_s(SRCodec(50.0, 200_000, torch.float32, torch.float16), 2, reps=3)
    assert 0 < small < big < 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(20, 200), st.sampled_from([1.0, 5.0, 50.0]),
       st.integers(1, 6), st.integers(0, 10**6))
def test_error_feedback_loses_no_gradient_mass(members, n, p, ratio, steps, seed):
    """What the receivers decoded plus the sender's memory equals every gradient given, entry by
    entry (float64; float16 values on the wire, their rounding kept in the memory too)."""
    g = torch.Generator().manual_seed(seed)
    fb = ErrorFeedback(SRCodec(ratio, p, torch.float64, torch.float16))
    given_sum = torch.zeros(members, n, p, dtype=torch.float64)
    received = torch.zeros_like(given_sum)
    skip = seed % members
    for _ in range(steps):
        grads = torch.randn(members, n, p, generator=g, dtype=torch.float64) * 1e-3
        bufs = fb.encode(grads, skip=skip)
        assert bufs[skip].numel() == 0
        for i, buf in enumerate(bufs):
            if i != skip:
                assert buf.numel() == fb.codec.encoded_bytes(n)
                received[i] += fb.decode(buf, n)
        given_sum += grads
    others = [i for i in range(members) if i != skip]
    assert torch.allclose(received[others] + fb.memory[others], given_sum[others], rtol=0, atol=1e-12)
    if fb.codec.k is None:  # dense: nothing left behind
        assert torch.equal(fb.memory, torch.zeros_like(fb.memory))
    else:  # each send carries at most k entries per row
        assert int((fb.decode(bufs[others[0]], n) != 0).sum(dim=1).max()) <= fb.codec.k


def test_sr_settings_name_the_bad_field():
    with pytest.raises(ValueError, match="sr grads must be one of"):
        SRSettings(50.0, grads="sparse")
    with pytest.raises(ValueError, match="sr decode 'expert' needs sr basis"):
        SRSettings(50.0, "delta", decode="expert")
