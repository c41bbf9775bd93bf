"""The GPT: gradients of the whole model, PyTorch parity, names, errors, KV cache, sampling."""
import os
import sys

import numpy as np
import pytest

import npgpt
from npgpt import GPT, GPTConfig, Tensor, backend
from npgpt.backend import to_numpy
from npgpt.sampling import sample_from_logits

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny(**kw):
    return GPT(GPTConfig(**{**TINY, **kw}))


def ids(xp, B, T, V=11, seed=0):
    return xp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)))


def test_parameter_names_are_gpt2s(xp):
    names = [n for n, _ in tiny().named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    for n in ["transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.bias"]:
        assert n in names
    assert "lm_head.weight" not in names  # tied to wte


def test_num_params_formula(xp):
    V, T, L, C = 11, 8, 2, 8
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert tiny().num_params() == V * C + T * C + L * per_block + 2 * C


def test_init_statistics(xp):
    backend.seed(0)
    m = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128))
    w = to_numpy(m.transformer.wte.weight.data)
    assert abs(w.std() - 0.02) < 0.001
    proj = to_numpy(m.transformer.h[0].mlp.c_proj.weight.data)
    assert abs(proj.std() - 0.02 / np.sqrt(2 * 4)) < 0.0005  # residual projections scaled by 1/sqrt(2L)
    assert (to_numpy(m.transformer.h[0].attn.c_attn.bias.data) == 0).all()
    assert m.transformer.wte.weight.dtype == np.float32


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_whole_model_gradcheck_float64(xp, pos):
    with backend.default_dtype(np.float64):
        backend.seed(1)
        m = tiny(pos=pos, dropout=0.0)
        x, y = ids(xp, 2, 5), ids(xp, 2, 5, seed=1)
        params = m.parameters()
        _, loss = m(x, y)
        loss.backward()
        analytic = [to_numpy(p.grad) for p in params]
        rng = np.random.default_rng(0)
        for _ in range(4):  # directional derivatives along random directions in parameter space
            d = [rng.standard_normal(p.shape) for p in params]
            norm = np.sqrt(sum((di ** 2).sum() for di in d))
            d = [di / norm for di in d]
            eps = 1e-6
            orig = [p.data.copy() for p in params]
            with npgpt.no_grad():
                for p, di, o in zip(params, d, orig):
                    p.data = o + eps * xp.asarray(di)
                fp = m(x, y)[1].item()
                for p, di, o in zip(params, d, orig):
                    p.data = o - eps * xp.asarray(di)
                fm = m(x, y)[1].item()
                for p, o in zip(params, orig):
                    p.data = o
            numeric = (fp - fm) / (2 * eps)
            an = sum(float((a * di).sum()) for a, di in zip(analytic, d))
            assert abs(an - numeric) <= 1e-8 + 1e-6 * abs(numeric), (an, numeric)


def test_torch_parity_logits_and_grads(xp):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from torch_gpt import from_npgpt
    with backend.default_dtype(np.float64):
        m = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16))
        for p in m.parameters():  # non-trivial LN/bias values
            p.data += xp.asarray(np.random.default_rng(3).normal(0, 0.1, p.shape))
        t = from_npgpt(m)
        x, y = ids(xp, 3, 8, V=13), ids(xp, 3, 8, V=13, seed=2)
        y[0, :3] = -100  # ignored targets
        logits, loss = m(x, y)
        loss.backward()
        tl, tloss = t(torch.from_numpy(to_numpy(x)), torch.from_numpy(to_numpy(y)))
        tloss.backward()
        np.testing.assert_allclose(logits.numpy(), tl.detach().numpy(), atol=1e-10)
        assert loss.item() == pytest.approx(tloss.item(), abs=1e-12)
        tgrads = dict(t.named_parameters())
        for name, p in m.named_parameters():
            np.testing.assert_allclose(to_numpy(p.grad), tgrads[name].grad.numpy(), atol=1e-10, err_msg=name)


def test_context_too_long_and_bad_ids_raise(xp):
    m = tiny()
    with pytest.raises(ValueError, match="block_size 8"):
        m(ids(xp, 1, 9))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        m(np.array([[0, 11]]))           # host ids are range-checked (device ids are not: no sync)
    with pytest.raises(TypeError, match="integer"):
        m(xp.asarray([[0.0, 1.0]]))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="pos"):
        GPTConfig(pos="rotary")
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"n_layers": 3})


def test_state_dict_round_trip_and_errors(xp):
    a, b = tiny(), tiny()
    backend.seed(5)
    b = tiny()
    b.load_state_dict(a.state_dict())
    x = ids(xp, 2, 6)
    np.testing.assert_array_equal(a(x)[0].numpy(), b(x)[0].numpy())
    sd = a.state_dict()
    sd["extra"] = np.zeros(1)
    del sd["transformer.wpe.weight"]
    with pytest.raises(KeyError, match="missing.*wpe.*unexpected.*extra"):
        b.load_state_dict(sd)
    sd = a.state_dict()
    sd["transformer.wte.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="wte"):
        b.load_state_dict(sd)


def test_kv_cache_matches_full_recompute(xp):
    backend.seed(2)
    m = tiny(block_size=12).eval()
    x = ids(xp, 2, 10)
    full, _ = m(x)
    cache = m.new_cache()
    step_logits = [m(x[:, :4], cache=cache)[0].data]        # prompt of 4, then one token at a time
    for t in range(4, 10):
        step_logits.append(m(x[:, t:t + 1], cache=cache)[0].data)
    cached = np.concatenate([to_numpy(s) for s in step_logits], axis=1)
    np.testing.assert_allclose(cached, full.numpy(), atol=1e-5)
    assert full.dtype == np.float32


def test_generate_cache_equals_no_cache_past_block_size(xp):
    backend.seed(3)
    m = tiny(block_size=6)
    prompt = ids(xp, 2, 3)
    a = m.generate(prompt, 10, temperature=0)  # greedy, slides past block_size 6
    b = m.generate(prompt, 10, temperature=0, use_cache=False)
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert a.shape == (2, 13) and (to_numpy(a[:, :3]) == to_numpy(prompt)).all()
    s1 = m.generate(prompt, 8, temperature=1.0, top_k=5, seed=7)
    s2 = m.generate(prompt, 8, temperature=1.0, top_k=5, seed=7, use_cache=False)
    np.testing.assert_array_equal(to_numpy(s1), to_numpy(s2))  # same seed, same tokens


def test_greedy_is_argmax_and_stream(xp):
    m = tiny().eval()
    prompt = ids(xp, 1, 4)
    out = m.generate(prompt, 1, temperature=0)
    np.testing.assert_array_equal(to_numpy(out[:, -1]), to_numpy(m(prompt)[0].data[:, -1].argmax(-1)))
    steps = list(m.generate_stream(prompt, 5, temperature=0))
    assert len(steps) == 5 and steps[0].shape == (1,)


def test_eos_stops_generation(xp):
    m = tiny().eval()
    prompt = ids(xp, 1, 4)
    first = int(to_numpy(m.generate(prompt, 1, temperature=0))[0, -1])
    out = m.generate(prompt, 20, temperature=0, eos_token=first)
    assert out.shape == (1, 5)


def test_sampling_filters(xp):
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = xp.asarray(np.log(probs).repeat(4000, axis=0))
    rng = xp.random.default_rng(0)
    s = to_numpy(sample_from_logits(logits, 1.0, top_p=0.6, rng=rng))
    assert set(np.unique(s)) == {0, 1}  # nucleus: smallest set with mass >= 0.6 is {0, 1}
    assert abs((s == 0).mean() - 0.5 / 0.8) < 0.03
    s = to_numpy(sample_from_logits(logits, 1.0, top_k=3, rng=rng))
    assert set(np.unique(s)) == {0, 1, 2}
    assert abs((s == 2).mean() - 0.15 / 0.95) < 0.03
    s = to_numpy(sample_from_logits(logits, 1.0, rng=rng))
    np.testing.assert_allclose(np.bincount(s, minlength=4) / len(s), probs[0], atol=0.03)
    for bad in [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0)]:
        with pytest.raises(ValueError):
            sample_from_logits(logits, **{"temperature": 1.0, **bad})


def test_sinusoidal_positions_known_values():
    from npgpt.model import sinusoidal_positions
    pe = sinusoidal_positions(5, 6)
    np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(pe[3, 0], np.sin(3.0))
    np.testing.assert_allclose(pe[3, 3], np.cos(3.0 / 10000 ** (2 / 6)))


def test_dropout_only_in_training(xp):
    m = tiny(dropout=0.5)
    x = ids(xp, 2, 5)
    m.eval()
    np.testing.assert_array_equal(m(x)[0].numpy(), m(x)[0].numpy())
    m.train()
    assert not np.array_equal(m(x)[0].numpy(), m(x)[0].numpy())
