"""lobes.launch: when the recipe starts its own CPU workers, their environment, and failure handling."""

import textwrap
import time

import pytest

from lobes.launch import should_spawn, spawn_cpu_workers


def test_should_spawn(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert should_spawn(2, {"device": "cpu"})
    assert not should_spawn(1, {"device": "cpu"})
    assert not should_spawn(2, {"device": "cuda:0"})
    assert not should_spawn(2, {"device": "cpu", "data_parallel_backend": True})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not should_spawn(2, {"device": "cpu"})  # already a torchrun (or spawned) worker
    with pytest.raises(ValueError, match="cpu_processes"):
        should_spawn(0, {"device": "cpu"})


def test_workers_get_a_ddp_environment(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"]
        with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as f:
            f.write(" ".join([os.environ[k] for k in keys] + sys.argv[2:]))
    """)
    )
    assert spawn_cpu_workers(str(script), [str(tmp_path), "x.yaml"], 2, threads_per_process=1) == 0
    fields = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
    assert [f[:3] for f in fields] == [["0", "0", "2"], ["1", "1", "2"]]
    assert fields[0][3:] == fields[1][3:]  # same rendezvous and arguments
    assert fields[0][5:] == ["1", "x.yaml", "--distributed_backend=gloo"]


def test_a_failing_worker_stops_the_others(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(120)\n")
    start = time.time()
    assert spawn_cpu_workers(str(script), [], 2, threads_per_process=1) == 3
    assert time.time() - start < 60
