"""CPU thread control (npgpt/threads.py): the default from the machine, the override, and that the
BLAS library and the elementwise pool both follow it."""
import os
import subprocess
import sys
import threading
import time

import pytest

from npgpt import threads
from npgpt.layers.tuning import TUNING


@pytest.fixture
def restore_threads():
    before = TUNING["numpy"]["threads"]
    yield
    threads.set_threads(before)


@pytest.mark.parametrize("cores, busy, expected", [(2, 0.1, 2), (2, 0.9, 1), (2, 1.4, 1), (2, 3.0, 1),
                                                   (8, 2.6, 5), (8, 0.0, 8), (1, 0.0, 1)])
def test_default_leaves_busy_cores_alone(monkeypatch, cores, busy, expected):
    monkeypatch.delenv("NPGPT_THREADS", raising=False)
    monkeypatch.setattr(threads, "cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda: (busy, "test"))
    n, why = threads.default_threads()
    assert n == expected == max(1, min(cores, cores - round(busy)))
    assert f"{cores} cores" in why


@pytest.mark.skipif(not os.path.exists("/proc/stat") or threads.cores() < 2, reason="Linux, 2 or more cores")
def test_busy_cores_sees_a_spinning_process():
    """Another process spinning on one core shows as about one busy core (measured, not the load average)."""
    idle, how = threads.busy_cores(0.3)
    assert how == "now"
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        time.sleep(0.5)                      # the spinner is running
        busy, _ = threads.busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= idle + 0.6


@pytest.mark.skipif(not os.path.exists("/proc/stat") or threads.cores() < 2, reason="Linux, 2 or more cores")
def test_busy_cores_leaves_out_this_process():
    """A thread of this process spinning (as BLAS workers do after a product) is not another process."""
    idle, _ = threads.busy_cores(0.3)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(0.2)
        busy, _ = threads.busy_cores(0.5)
    finally:
        stop.set()
        spinner.join()
    assert busy < idle + 0.4


def test_environment_overrides_the_machine(monkeypatch):
    monkeypatch.setenv("NPGPT_THREADS", "3")
    monkeypatch.delenv("NPGPT_THREADS_WHY", raising=False)
    monkeypatch.setattr(threads, "busy_cores", lambda: (9.0, "test"))
    assert threads.default_threads() == (3, "NPGPT_THREADS")


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_bad_environment_is_one_clear_error(monkeypatch, bad):
    monkeypatch.setenv("NPGPT_THREADS", bad)
    with pytest.raises(ValueError, match="NPGPT_THREADS"):
        threads.default_threads()


def test_set_threads_reaches_blas_and_the_pool(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    for n in (1, 2):
        assert threads.set_threads(n) == n
        assert TUNING["numpy"]["threads"] == n
        assert threads.get_threads() == n
        blas = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(b == n for b in blas)


def test_use_threads_zero_means_the_default(monkeypatch, restore_threads):
    monkeypatch.setenv("NPGPT_THREADS", "1")
    assert threads.use_threads(0) == (1, "NPGPT_THREADS")
    assert threads.use_threads(2) == (2, "asked for")
    with pytest.raises(ValueError, match="threads"):
        threads.use_threads(-1)


def test_train_config_refuses_negative_threads():
    from npgpt.train import TrainConfig
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=-1)


def test_cli_threads_option(monkeypatch, restore_threads, capsys):
    from npgpt.cli import main
    assert main(["--threads", "-3", "gradcheck"]) == 2
    assert "threads must be >= 1" in capsys.readouterr().err
    monkeypatch.setenv("NPGPT_THREADS", "zero")
    assert main(["gradcheck", "--threads", "0"]) == 2
    assert "NPGPT_THREADS" in capsys.readouterr().err
