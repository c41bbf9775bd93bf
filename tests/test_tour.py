"""The guided tour in ``examples/tour/`` runs: every script, as ``python script.py`` in its quick
setting, in a temporary working directory; its own asserts check the math. 05 is run twice: after
04 (it samples from 04's checkpoint) and alone (it trains its own quick model)."""
import glob
import os
import subprocess
import sys

import pytest

import npgpt

TOUR = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "examples", "tour"))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(TOUR, "[0-9][0-9]_*.py")))


def test_the_tour_has_its_five_steps():
    assert SCRIPTS == ["01_tensor.py", "02_gradcheck.py", "03_attention_head.py", "04_tiny_gpt.py",
                       "05_sampling.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_a_notebook_of_cells(name):
    with open(os.path.join(TOUR, name), encoding="utf-8") as f:
        lines = f.read().splitlines()
    markdown = [i for i, line in enumerate(lines) if line.strip() == "# %% [markdown]"]
    code = [i for i, line in enumerate(lines) if line.strip() == "# %%"]
    assert lines[0] == "# %% [markdown]", "a tour script opens with its prose cell"
    assert len(markdown) >= 2 and len(code) >= 2, "prose and code in cells"


def run_script(name, cwd):
    """Run ``python examples/tour/<name>`` in ``cwd`` with NPGPT_TOUR_QUICK=1, RuntimeWarnings as
    errors (as in the suite), and one BLAS thread: the matrices are tiny, and on a shared 2-core
    machine several BLAS threads per process fight the other processes for the cores (measured: the
    quick 04 + 05 took 75 s of wall time with OpenBLAS's default threads under load, 5 s with one).
    Returns the script's printed output."""
    root = os.path.dirname(os.path.dirname(npgpt.__file__))       # the npgpt this suite imports
    env = dict(os.environ, NPGPT_TOUR_QUICK="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p))
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", os.path.join(TOUR, name)],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.parametrize("name", ["01_tensor.py", "02_gradcheck.py", "03_attention_head.py"])
def test_first_steps_run(name, tmp_path):
    assert run_script(name, tmp_path).strip()


def test_train_then_sample(tmp_path):
    out = run_script("04_tiny_gpt.py", tmp_path)
    assert "val loss after 30 steps" in out
    assert (tmp_path / "tour_tiny_gpt.npz").exists()
    out = run_script("05_sampling.py", tmp_path)
    assert "loaded tour_tiny_gpt.npz" in out


def test_sampling_runs_alone(tmp_path):
    out = run_script("05_sampling.py", tmp_path)
    assert "trained a quick model" in out
    assert not (tmp_path / "tour_tiny_gpt.npz").exists()
