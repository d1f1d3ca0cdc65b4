"""The frozen-rank watchdog (minalign/distributed.py): under torchrun with two CPU processes, a SIGSTOPped rank
ends the job within the heartbeat timeout, named with its label; a rank that is only slow does not.

The ranks run this file's __main__ (`torchrun ... -m tests.test_watchdog MODE`).
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minalign import distributed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 3  # MINALIGN_HEARTBEAT_TIMEOUT of these runs, seconds
INTERVAL = TIMEOUT / 4  # the heartbeat's
LABEL = "sampling batch 3/10"


def torchrun(mode: str, pid_file: Path) -> tuple[int, float, list[tuple[float, str]]]:
    """Run this file's __main__ in MODE on two ranks; return (status, seconds, [(seconds, stderr line)]).

    The rank that freezes writes its pid to pid_file first; it is killed here whatever happens."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.test_watchdog", mode, str(pid_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINALIGN_HEARTBEAT_TIMEOUT": str(TIMEOUT)}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic() - start, line.rstrip("\n"))
                                                          for line in proc.stderr), daemon=True)
    reader.start()
    try:
        status = proc.wait(timeout=60)
        reader.join(5)
        return status, time.monotonic() - start, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid_file.exists():  # never leave a stopped rank behind
            pid = int(pid_file.read_text())
            try:
                if "test_watchdog" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass


def test_a_frozen_rank_ends_the_job_naming_it_and_its_label(tmp_path):
    status, seconds, lines = torchrun("freeze", tmp_path / "pid")
    text = "\n".join(line for _, line in lines)
    frozen_at = next(t for t, line in lines if line == "rank 1: freezing")
    reports = [(t, line) for t, line in lines if "stopped making progress" in line]
    assert status != 0, text
    assert len(reports) == 1, text
    t, line = reports[0]
    assert line.startswith("test_watchdog.py: rank 1 (pid "), line
    assert f"while {LABEL}, for " in line and line.endswith("; ending the job"), line
    # Seen the timeout after its last heartbeat, give or take two heartbeat intervals (0.75 s: one between
    # beats, one between the watchdog's looks), plus scheduling slack; the job then ends at once, not
    # torchrun's 30 s later (the stopped rank is killed: torchrun's SIGTERM would wait for a SIGCONT).
    assert TIMEOUT - INTERVAL <= t - frozen_at < TIMEOUT + 2 * INTERVAL + 2, (t - frozen_at, text)
    assert seconds - t < 5, (seconds - t, text)
    print(f"frozen -> reported {t - frozen_at:.1f} s, reported -> job ended {seconds - t:.1f} s, "
          f"whole run {seconds:.1f} s")


def test_a_slow_rank_and_a_long_wait_at_a_barrier_do_not(tmp_path):
    status, seconds, lines = torchrun("slow", tmp_path / "pid")
    text = "\n".join(line for _, line in lines)
    assert status == 0, text
    assert seconds > 8, text  # it lasted rank 1's 8 s, rank 0 waiting at the barrier over twice the timeout
    assert lines == [], text  # not a word from the watchdog (nor anyone)
    print(f"slow run {seconds:.1f} s")


def test_heartbeat_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("MINALIGN_HEARTBEAT_TIMEOUT", raising=False)
    assert distributed.heartbeat_timeout() == distributed.HEARTBEAT_TIMEOUT == 300
    for text, value in [("0", 0), ("2.5", 2.5), (" 60 ", 60)]:
        monkeypatch.setenv("MINALIGN_HEARTBEAT_TIMEOUT", text)
        assert distributed.heartbeat_timeout() == value
    for text in ["-1", "soon", "nan", "inf", "1e400", "0.3"]:  # under a second would end healthy jobs
        monkeypatch.setenv("MINALIGN_HEARTBEAT_TIMEOUT", text)
        with pytest.raises(ValueError, match="MINALIGN_HEARTBEAT_TIMEOUT"):
            distributed.heartbeat_timeout()


def test_doing_sets_the_label_and_a_wait_labels_itself():
    distributed.doing("scoring")
    label, since = distributed._doing
    assert label == "scoring" and since <= time.monotonic()
    with distributed._waiting():
        assert distributed._doing[0] == "waiting for the other ranks after scoring"
    assert distributed._doing[0] == "scoring"


if __name__ == "__main__":  # torchrun ... -m tests.test_watchdog freeze|slow PID_FILE
    mode, pid_file = sys.argv[1], Path(sys.argv[2])
    rank, world, device = distributed.init("cpu")
    distributed.barrier()  # both heartbeats running
    if rank == 1:
        distributed.doing(LABEL)
        time.sleep(1.5)  # at it for two heartbeats (a rank freezing the instant it takes a label may be
        # reported with the label of its last heartbeat, the one before)
        if mode == "freeze":
            pid_file.write_text(str(os.getpid()))
            print("rank 1: freezing", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(6.5)  # 8 s in all: slow, not frozen: its heartbeat goes on
    distributed.barrier()  # rank 0 waits here
    distributed.exit(0)
