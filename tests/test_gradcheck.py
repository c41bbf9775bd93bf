"""The public gradcheck: passes correct ops, catches wrong ones with a useful message."""
import numpy as np
import pytest

from npgpt import Tensor, gradcheck, GradcheckError
from npgpt.cli import main
from npgpt.gradcheck import gradcheck_report


def wrong_square(x):
    """x^2 with a deliberately wrong derivative (x instead of 2x)."""
    def backward(dout):
        x._accumulate(dout * x.data)
    return Tensor.from_op(x.data ** 2, (x,), backward, "wrong_square")


def test_catches_wrong_backward_and_names_the_input(xp):
    x = np.array([[0.5, -1.0], [2.0, 3.0]])
    with pytest.raises(GradcheckError) as e:
        gradcheck(lambda a, b: (a * 2 + wrong_square(b)).sum(), [xp.asarray(x), xp.asarray(x)])
    msg = str(e.value)
    # the error of element i is |r| |x_i| for the scalar projection r: worst at the largest |x|
    assert "input 1" in msg and "(1, 1)" in msg and "analytic" in msg and "numeric" in msg
    rep = gradcheck_report(lambda a, b: (a * 2 + wrong_square(b)).sum(), [xp.asarray(x), xp.asarray(x)])
    bad = rep.inputs[1]
    assert rep.inputs[0].ok and not bad.ok
    assert bad.numeric == pytest.approx(2 * bad.analytic, rel=1e-6)  # 2x vs x at x = 3


def test_directional_mode_for_large_inputs(xp):
    x = xp.asarray(np.random.default_rng(0).normal(size=(40, 40)))
    assert gradcheck(lambda t: (t * t).sum(axis=0), [x], max_elements=100)
    rep = gradcheck_report(lambda t: wrong_square(t), [x], max_elements=100)
    assert rep.inputs[0].mode == "directional" and not rep.ok
    with pytest.raises(GradcheckError, match="direction"):
        gradcheck(wrong_square, [x], max_elements=100)


def test_constant_inputs_and_tuple_outputs(xp):
    ids = xp.asarray([2, 0, 2])  # integer input: passed as a constant, not checked
    w = xp.asarray(np.random.default_rng(1).normal(size=(3, 2)))
    assert gradcheck(lambda i, t: (t[i.data], t * 3.0), [ids, w])
    const = Tensor(xp.asarray([1.0, 2.0]))  # Tensor without requires_grad: constant
    assert gradcheck(lambda c, t: c * t, [const, xp.asarray([3.0, 4.0])])
    with pytest.raises(ValueError, match="no input to check"):
        gradcheck(lambda i: i * 1, [ids])


def test_inputs_are_not_modified(xp):
    x = xp.asarray([1.0, 2.0, 3.0], dtype=np.float32)
    before = x.copy()
    gradcheck(lambda t: t.exp(), [x])
    assert (x == before).all() and x.dtype == np.float32


def test_cli_gradcheck_table_all_ops_pass(capsys):
    rc = main(["gradcheck"])
    out = capsys.readouterr().out
    assert rc == 0
    for op in ["add", "matmul 2-D", "getitem (repeated ids)", "split", "masked_fill", "var (axis)"]:
        assert op in out
    assert "FAIL" not in out and "ops pass" in out


def test_cli_gradcheck_filter_and_unknown_op(capsys):
    assert main(["gradcheck", "--op", "tanh"]) == 0
    assert "tanh" in capsys.readouterr().out
    assert main(["gradcheck", "--op", "no-such-op"]) == 2
    assert "no op matches" in capsys.readouterr().err
