"""Data-parallel training (npgpt/distributed): launch detection, buckets and data order in process; then real
`mpiexec -n 2` runs checked against single-process runs computed independently (float64): 2 ranks x
accumulation 1 = 1 process x accumulation 2, ZeRO-1 on = off, resume 2 -> 1 and 1 -> 2 ranks, and a failing
or killed rank ending the job with one message. The MPI tests skip without mpi4py and mpiexec."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.distributed import world_from_env
from npgpt.distributed.buckets import BucketPlan, GradientReadiness
from npgpt.train import TrainConfig
from npgpt.train_helpers import batch_source, make_optimizer
from test_train import make_char_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 60


def make_data(d):
    """A char-level data set written by hand (not by npgpt prepare)."""
    return make_char_data(d, TEXT)


# ---- in process: launch detection, buckets, readiness, data order -----------------------------------------

def test_world_from_env_reads_each_launcher():
    assert world_from_env({}).size == 1 and not world_from_env({}).parallel
    hydra = world_from_env({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (hydra.rank, hydra.size, hydra.launcher) == (1, 2, "MPICH (Hydra)")
    assert world_from_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}).rank == 3
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"}).size == 8
    # an sbatch script is one process even though SLURM_NTASKS says 8: only srun's step size counts
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).size == 1
    with pytest.raises(ValueError, match="outside"):
        world_from_env({"PMI_RANK": "2", "PMI_SIZE": "2"})


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_bucket_plan_partitions_the_buffer(world):
    sizes = [7, 300, 13, 1, 250, 64, 5]
    offsets = [int(o) for o in np.cumsum([0] + sizes[:-1])]
    plan = BucketPlan(offsets, sizes, sum(sizes), world, bucket_elements=100)
    assert plan.buckets[0][1] == sum(sizes) and plan.buckets[-1][0] == 0           # launch order: from the end
    covered = sorted(plan.buckets)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))                 # contiguous, no overlap
    assert all(lo % world == 0 for lo, _ in plan.buckets)                          # edges are multiples of N
    owner = np.zeros(sum(sizes), int)
    for r in range(world):
        for lo, hi in plan.own_chunks(r):
            owner[lo:hi] += 1
    for lo, hi in plan.tails():
        assert hi - lo < world
        owner[lo:hi] += 1
    assert (owner == 1).all()                                                      # every element updated once
    assert BucketPlan([0, 6, 10], [6, 4, 5], 15, 2, 8).buckets == [(6, 15), (0, 6)]   # the docstring's example


def test_buckets_launch_in_order_once_their_gradients_are_final():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8))
    flat = make_optimizer(model.parameters(), 1e-3, 0.1, (0.9, 0.95)).flat      # FlatAdamW's flat buffers
    plan = BucketPlan(flat.offsets, [p.size for p in flat.params], flat.size, 2, bucket_elements=300)
    assert len(plan.buckets) > 2
    seen = []
    readiness = GradientReadiness(plan, flat.params,
                                  lambda b: seen.append((b, flat.grad[slice(*plan.buckets[b])].copy())))
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    _, loss = model(idx, targets=idx)
    readiness.arm(loss)
    loss.backward()
    launched_during_backward = len(seen)
    readiness.flush()
    assert [b for b, _ in seen] == list(range(len(plan.buckets)))
    assert launched_during_backward == len(plan.buckets)        # every parameter is used: none left for flush
    for b, snapshot in seen:                                     # nothing changed after the launch
        np.testing.assert_array_equal(snapshot, flat.grad[slice(*plan.buckets[b])])


class _Rank:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_rank_r_draws_micro_step_k_n_plus_r(tmp_path):
    data = np.arange(5000, dtype=np.uint16)
    cfg = TrainConfig(data=make_data(str(tmp_path / "d")), out_dir=str(tmp_path / "o"), batch_size=3, block_size=8)
    single = batch_source(data, cfg, 0, np.random.default_rng(7))
    stream = [single()[0] for _ in range(12)]
    for world in (2, 3):
        rngs = [np.random.default_rng(7) for _ in range(world)]
        sources = [batch_source(data, cfg, 0, rngs[r], comm=_Rank(r, world)) for r in range(world)]
        for k in range(12 // world):
            for r in range(world):
                np.testing.assert_array_equal(sources[r]()[0], stream[k * world + r])
        states = [g.bit_generator.state for g in rngs]           # every rank's stream stays the same
        assert all(s == states[0] for s in states)


def test_a_single_process_never_imports_mpi4py(tmp_path):
    code = ("import sys; from npgpt.train import TrainConfig, train; "
            f"train(TrainConfig(data={make_data(str(tmp_path / 'd'))!r}, out_dir={str(tmp_path / 'o')!r}, n_layer=1, "
            "n_head=1, n_embd=8, block_size=8, batch_size=2, max_iters=2, eval_iters=1, progress=False), "
            "log=lambda *a: None); assert 'mpi4py' not in sys.modules, 'mpi4py imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---- real launches: mpiexec -n 2 ---------------------------------------------------------------------------

def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_", "MPI_"))}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    return env


def _mpiexec():
    pytest.importorskip("mpi4py")
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec (pip install -e '.[mpi]')")
    return [exe, "-n", "2"]


SMALL_BUCKETS = ("import sys, npgpt.distributed.data_parallel as D; D.BUCKET_BYTES = 8192; from npgpt.cli import main; "
                 "sys.exit(main(sys.argv[1:]))")     # many buckets, chunks and a tail: every path of zero.py


def _train(out_dir, data, ranks=1, timeout=180, small_buckets=False, **knobs):
    """npgpt train as a user runs it (a subprocess), float64; returns the CompletedProcess."""
    # n_embd 15, block_size 17: an odd number of weights, so with small buckets the last bucket has a tail
    base = dict(data=data, out_dir=out_dir, n_layer=2, n_head=3, n_embd=15, block_size=17, batch_size=4,
                max_iters=20, lr_decay_iters=20, warmup_iters=4, eval_interval=10, eval_iters=4, log_interval=1,
                progress="false", learning_rate=3e-3, dtype="float64", grad_clip=1.0)
    base.update(knobs)
    cmd = (_mpiexec() if ranks > 1 else []) + [sys.executable] + (["-c", SMALL_BUCKETS] if small_buckets else
                                                                   ["-m", "npgpt.cli"]) + ["train", "--no_sample"]
    cmd += [f"--{k}={v}" for k, v in base.items()]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _run(out_dir):
    """(step losses, eval records, final weights) of a finished run."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    steps = {r["iter"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["iter"]: (r["train_loss"], r["val_loss"]) for r in rows if "val_loss" in r}
    ckpt = np.load(os.path.join(out_dir, "ckpt.npz"), allow_pickle=True)
    weights = {k: ckpt[k] for k in ckpt.files if k.startswith("model/")}
    return steps, evals, weights


def _assert_same_run(a, b, rtol=1e-12):
    (steps_a, evals_a, w_a), (steps_b, evals_b, w_b) = a, b
    assert sorted(steps_a) == sorted(steps_b) and len(steps_a) >= 10
    np.testing.assert_allclose([steps_a[i] for i in sorted(steps_a)], [steps_b[i] for i in sorted(steps_b)], rtol=rtol)
    assert sorted(evals_a) == sorted(evals_b)
    np.testing.assert_allclose([evals_a[i] for i in sorted(evals_a)], [evals_b[i] for i in sorted(evals_b)], rtol=rtol)
    assert sorted(w_a) == sorted(w_b)
    for k in w_a:
        np.testing.assert_allclose(w_a[k], w_b[k], rtol=rtol, atol=1e-13, err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, accumulation 2, 20 steps: the run every parallel run below must reproduce."""
    _mpiexec()
    root = tmp_path_factory.mktemp("dp")
    data = make_data(str(root / "data"))
    _train(str(root / "single"), data, gradient_accumulation_steps=2)
    return root, data, _run(str(root / "single"))


@pytest.mark.parametrize("zero", ["true", "false"])
def test_two_ranks_equal_one_process_with_twice_the_accumulation(reference, zero):
    root, data, single = reference
    r = _train(str(root / f"two-{zero}"), data, ranks=2, zero=zero, small_buckets=True)
    assert r.stdout.count("step 20:") == 1                              # rank 0 alone prints
    assert ("ZeRO-1" in r.stdout) == (zero == "true")
    assert int(r.stdout.split(" gradient bucket")[0].rsplit(" ", 1)[1]) > 3
    _assert_same_run(_run(str(root / f"two-{zero}")), single)


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_onto_another_number_of_ranks_continues_the_run(reference, first, then):
    root, data, single = reference
    out = str(root / f"resume-{first}-{then}")
    _train(out, data, ranks=first, gradient_accumulation_steps=2 // first, max_iters=10)
    _train(out, data, ranks=then, gradient_accumulation_steps=2 // then, init_from="resume")
    _assert_same_run(_run(out), single)


FAILING_RANK = """
import os, sys
import npgpt.train as T
from npgpt.cli import main
from npgpt.distributed import world_from_env
rank, step, calls = world_from_env().rank, T.train_step, [0]
def failing_step(*args, **kwargs):
    calls[0] += 1
    if rank == 1 and calls[0] == 5:
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), 9)
        raise RuntimeError("disk on fire at step 5")
    return step(*args, **kwargs)
T.train_step = failing_step
sys.exit(main(["train", "--no_sample"] + sys.argv[2:]))
"""


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_without_hanging(reference, tmp_path, how):
    root, data, _ = reference
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cmd = _mpiexec() + [sys.executable, str(script), how, f"--data={data}", f"--out_dir={tmp_path / 'out'}",
                        "--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--batch_size=2",
                        "--max_iters=50", "--eval_iters=1", "--progress=false"]
    start = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=90)
    assert time.time() - start < 60
    assert r.returncode != 0
    if how == "raise":
        assert r.stderr.count("disk on fire at step 5") >= 1
        assert "rank 1 of 2 failed with RuntimeError: disk on fire at step 5; stopping all 2 ranks" in r.stderr


def test_one_message_for_an_error_every_rank_shares(reference, tmp_path):
    cmd = _mpiexec() + [sys.executable, "-m", "npgpt.cli", "train", f"--data={tmp_path / 'nowhere'}",
                        f"--out_dir={tmp_path / 'out'}"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    assert r.stderr.count("npgpt train: error:") == 1 and "holds no prepared data" in r.stderr


def test_missing_mpi4py_is_one_clear_error(reference, tmp_path):
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named mpi4py (hidden by the test)')\n")
    env = _env()
    env["PYTHONPATH"] = f"{tmp_path / 'fake'}{os.pathsep}{ROOT}"
    cmd = _mpiexec() + [sys.executable, "-m", "npgpt.cli", "train", f"--data={reference[1]}",
                        f"--out_dir={tmp_path / 'out'}", "--max_iters=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    assert r.stderr.count("mpi4py is not installed") == 1 and ".[mpi]" in r.stderr
