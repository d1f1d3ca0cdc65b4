"""torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), nanoGPT style.

Under plain `python` there is no process group: a world of one, rank 0, and every helper is a no-op.
A CLI ends with `distributed.exit(status)`.

Frozen ranks. Under torchrun each rank also runs a heartbeat and a watchdog thread (see `Watchdog`): the first
publishes "alive, doing <label> for N s" to the job's store every few seconds and reads the other ranks'
heartbeats; the second ends the job when a rank's heartbeat has stopped for MINALIGN_HEARTBEAT_TIMEOUT seconds
(default 300; 0 turns it off): that rank is frozen (SIGSTOPped, a whole process wedged). The ranks that see it
print one line naming it and its label, and end themselves with status 3, so torchrun ends the job. A rank that
is merely slow, or waits at a barrier for one that is, keeps its heartbeat going: a long wait is never a reason.
`doing(label)` names what a rank is doing, for that message; `barrier` and `all_sum` label their waits.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minalign.errors import ConfigError


def init(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); return (rank, world_size, device).

    device: "cpu" or "cuda" (None: cuda if available). Under torchrun, CUDA means cuda:LOCAL_RANK.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(kind)
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    timeout = heartbeat_timeout()  # a ConfigError before the process group exists, so a plain exit is clean
    dev = torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    # Ranks finish their shards at different times and then wait for each other; the default timeout
    # (10-30 min) could fire in that wait on a long run. A frozen rank is caught by the heartbeat instead (see
    # the module doc), in minutes; this timeout is left for what the heartbeat cannot see (a rank alive but
    # stuck in a collective, say on a GPU that stopped answering), where a short one would also end long waits.
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=datetime.timedelta(hours=6),
                            device_id=dev if kind == "cuda" else None)
    global _watchdog
    if world > 1 and timeout > 0 and _watchdog is None:
        _watchdog = Watchdog(rank, world, timeout)
        _watchdog.start()
    return rank, world, dev


HEARTBEAT_TIMEOUT = 300.0  # seconds without a heartbeat after which a rank counts as frozen (env overrides)
FROZEN_STATUS = 3  # the exit status of a rank that ends the job over a frozen peer
_doing = ("starting", time.monotonic())  # (label, since): what this rank is doing, for its heartbeat
_watchdog: Watchdog | None = None


def doing(label: str) -> None:
    """Name what this rank is doing now ("sampling batch 3/10"), for the message that reports it frozen.

    Cheap (one assignment; the heartbeat thread reads it), so call it as often as the work changes. A label
    never ends the job: a rank that stays on one label for hours, beating, is slow, not frozen.
    """
    global _doing
    _doing = (label, time.monotonic())


@contextlib.contextmanager
def _waiting():
    """Label a wait for the other ranks ("waiting for the other ranks after <label>") while it lasts."""
    label, _ = _doing
    doing(f"waiting for the other ranks after {label}")
    try:
        yield
    finally:
        doing(label)


def heartbeat_timeout() -> float:
    """MINALIGN_HEARTBEAT_TIMEOUT in seconds (HEARTBEAT_TIMEOUT if unset; 0: no watchdog); ConfigError if bad."""
    text = os.environ.get("MINALIGN_HEARTBEAT_TIMEOUT", "").strip()
    if not text:
        return HEARTBEAT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    # Under a second, a beat every timeout/4 s is late whenever a thread waits a moment for the GIL: a healthy
    # job would be ended.
    if not (value == 0 or 1 <= value < float("inf")):
        raise ConfigError(f"MINALIGN_HEARTBEAT_TIMEOUT={text!r}: expected 0 (the frozen-rank watchdog off) or "
                         f"seconds, at least 1")
    return value


def _start_time(pid: int) -> str | None:
    """When process pid started (the starttime of /proc/<pid>/stat, clock ticks since boot), or None: with the
    pid, it names one process even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _prog() -> str:
    return os.path.basename(sys.argv[0]) or "python"


class Watchdog:
    """A rank's heartbeat and watchdog: two daemon threads, started by `init` under torchrun.

    The heartbeat thread writes this rank's heartbeat {seq, label, for, host, pid, start, done} every `interval`
    seconds to its own client of the job's c10d store (the TCPStore at MASTER_ADDR:MASTER_PORT: torchrun's
    agent hosts it when TORCHELASTIC_USE_AGENT_STORE is True, else rank 0 does), and reads the heartbeats of
    the ranks it watches (all others; in a world over 64, those 1, 2, 4, 8, ... ranks on, so each rank has
    about log2(world) watchers, some on other nodes). A heartbeat is fresh when its seq changed, timed on this
    rank's own monotonic clock (no clock is compared across hosts).

    The watchdog thread does no I/O (a store op can block for good: a TCPStore client waits on a stopped server
    past its timeout), only looks at the times: a rank whose seq has not changed for `timeout` seconds is
    frozen, every thread of it stopped. A rank that works or waits at a barrier, however long, keeps its
    heartbeat going and is never reported: frozen and slow are told apart by whether the process runs at all,
    never by how long a step takes. A store that has not answered for `timeout` ends the job too, naming rank 0
    where rank 0 hosts it.

    On a frozen rank it prints one line (one per host: the first rank there to see it claims a store key) and
    ends this process with FROZEN_STATUS; torchrun then stops the others. A frozen rank on this host (the pid
    and process start time of its heartbeat) is SIGKILLed first: torchrun kills the other workers of a failed
    job 30 s after its SIGTERM, which a stopped process does not act on. A rank that leaves through `exit` (or
    at interpreter exit) marks its heartbeat done, and is watched no more.
    """

    def __init__(self, rank: int, world: int, timeout: float):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.interval = max(0.1, min(5.0, timeout / 4))
        offsets = range(1, world) if world <= 64 else [1 << i for i in range(world.bit_length()) if 1 << i < world]
        self.peers = sorted({(rank + o) % world for o in offsets} - {rank})
        self.addr, self.port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
        self.agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        # A restarted worker group (--max-restarts) shares the agent's store: its own keys.
        self.prefix = (f"minalign/heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                       f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
        self.host, self.seq, self.start_time = socket.gethostname(), 0, _start_time(os.getpid())
        now = time.monotonic()
        self.last_ok = now  # when the store last answered a whole round
        self.changed = dict.fromkeys(self.peers, now)  # when each peer's seq last changed
        self.seen: dict[int, dict] = {}  # each peer's latest heartbeat
        self.error: Exception | None = None  # the store's last error
        self._stop, self._finished = threading.Event(), threading.Event()
        self._store = None
        self._threads = [threading.Thread(target=self._heartbeat, name="minalign-heartbeat", daemon=True),
                         threading.Thread(target=self._watch, name="minalign-watchdog", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def finish(self, wait: float = 2.0) -> None:
        """Mark this rank's heartbeat done (it is leaving; the others stop watching it) and stop the threads."""
        self._stop.set()
        self._finished.wait(wait)

    # The heartbeat thread: all the store I/O.

    def _heartbeat(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if self._store is None:
                        self._store = dist.PrefixStore(self.prefix, dist.TCPStore(
                            self.addr, self.port, is_master=False, wait_for_workers=False,
                            timeout=datetime.timedelta(seconds=self.timeout)))
                    self._beat()
                    present = [q for q in self.peers if q in self.seen or self._store.check([f"beat/{q}"])]
                    values = self._store.multi_get([f"beat/{q}" for q in present]) if present else []
                except Exception as e:  # not answered (in time): the watchdog times the silence
                    self.error = e
                else:
                    now = time.monotonic()
                    for q, raw in zip(present, values):
                        beat = json.loads(raw)
                        if q not in self.seen or beat["seq"] != self.seen[q]["seq"]:
                            self.seen[q], self.changed[q] = beat, now
                    self.last_ok = now
                self._stop.wait(self.interval)
            if self._store is not None:
                self._beat(done=True)
        except Exception as e:  # a bug of ours must not end the job: say so, and stop being watched
            print(f"{_prog()}: [rank {self.rank}] warning: the heartbeat stopped: {e!r}", file=sys.stderr)
            self._stop.set()
            with contextlib.suppress(Exception):
                self._beat(done=True)
        finally:
            self._finished.set()

    def _beat(self, done: bool = False) -> None:
        label, since = _doing
        self.seq += 1
        self._store.set(f"beat/{self.rank}", json.dumps({
            "seq": self.seq, "label": label, "for": round(time.monotonic() - since, 1), "host": self.host,
            "pid": os.getpid(), "start": self.start_time, "done": done}))

    # The watchdog thread: no I/O, so nothing can block it.

    def _watch(self) -> None:
        resumed = before = time.monotonic()  # resumed: times start again after this process was itself stopped
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - before > self.interval + self.timeout / 2:  # stopped itself: SIGSTOP and SIGCONT, a VM paused
                resumed = now
            before = now
            if now - max(self.last_ok, resumed) > self.timeout:
                self._end_over_store(now - self.last_ok)
            ages = {q: now - max(self.changed[q], resumed) for q in self.peers
                    if not self.seen.get(q, {}).get("done")}
            frozen = [q for q, age in ages.items() if age > self.timeout]
            if frozen:
                self._end_over_peer(frozen[0], now - self.changed[frozen[0]])

    def _end_over_peer(self, q: int, age: float) -> None:
        beat = self.seen.get(q)
        if beat is None:
            who, what = f"rank {q}", f"no heartbeat in {age:.0f} s since the start"
        else:
            who = f"rank {q} (pid {beat['pid']} on {beat['host']})"
            what = f"last heartbeat {age:.0f} s ago, while {beat['label']}, for {beat['for']:.0f} s by then"
        self._kill_if_here(beat)
        self._end(f"{who} stopped making progress ({what}); ending the job", claim=f"ending/{self.host}")

    def _end_over_store(self, age: float) -> None:
        where, error = f"{self.addr}:{self.port}", self.error
        if self.agent_store:
            why = f" ({type(error).__name__}: {str(error).splitlines()[0]})" if error and str(error) else ""
            self._end(f"the job's store at {where} (torchrun's agent) has not answered for {age:.0f} s{why}; "
                      f"ending the job")
        beat0 = self.seen.get(0)
        self._kill_if_here(beat0)
        label = f", last heartbeat while {beat0['label']}" if beat0 else ""
        self._end(f"rank 0 (which hosts the job's store at {where}) stopped making progress (the store has not "
                  f"answered for {age:.0f} s{label}); ending the job")

    def _kill_if_here(self, beat: dict | None) -> None:
        """SIGKILL the rank of this heartbeat if it runs on this host (the same pid and process start time)."""
        if beat and beat["host"] == self.host and beat.get("start") and _start_time(beat["pid"]) == beat["start"]:
            with contextlib.suppress(OSError):
                os.kill(beat["pid"], signal.SIGKILL)

    def _end(self, message: str, claim: str | None = None) -> None:
        """Print message (unless another rank claimed the store key first) and end this process at once."""
        first = [True]

        def claim_it():
            with contextlib.suppress(Exception):
                first[0] = self._store.add(claim, 1) == 1

        if claim and self._store is not None:  # in a thread of its own, waited on briefly: it may never return
            t = threading.Thread(target=claim_it, daemon=True)
            t.start()
            t.join(min(2.0, self.timeout))
        if first[0]:
            print(f"{_prog()}: {message}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(FROZEN_STATUS)


@atexit.register
def _leave() -> None:
    """At interpreter exit (not through `exit`): mark this rank's heartbeat done."""
    if _watchdog is not None:
        _watchdog.finish()


SMALL_MODEL = 100_000_000  # parameters; below this a CPU op is too small to share out over threads


def fit_threads(model: torch.nn.Module) -> torch.nn.Module:
    """On the CPU, one intra-op thread for a model under SMALL_MODEL parameters; returns the model.

    Such a model's matmuls are too small to split, and torch's threads spin-wait for each other: on 2 cores beside
    one other busy process a 200-step SFT of the demo's model took 24-49 s with 2 threads and 6.6 s with one.
    Left alone where the user chose (OMP_NUM_THREADS set, as torchrun also does) or the model is on a GPU.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return model
    first = next(model.parameters(), None)
    if first is not None and first.device.type in ("cpu", "meta") and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)
    return model


def release_memory() -> None:
    """Give a dropped model's memory back before the next one is loaded (call after `del model`)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_main() -> bool:
    """Whether this process is rank 0 (or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait until every rank gets here."""
    if dist.is_initialized():
        with _waiting():
            dist.barrier()


def all_sum(values: list[int]) -> list[int]:
    """Element-wise sum of integer counts over all ranks (the counts themselves in a world of one)."""
    if not dist.is_initialized():
        return list(values)
    return all_sum_tensor(torch.tensor(values, dtype=torch.long)).tolist()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of t over all ranks (t itself in a world of one), on t's device; t is not changed."""
    if not dist.is_initialized():
        return t
    out = t.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
    with _waiting():
        dist.all_reduce(out)
        return out.to(t.device)


def exit(code: int):
    """End the process with this status.

    Under torchrun the process group is not torn down: gloo's threads can abort the teardown ("terminate called
    without an active exception", after all work is done and written), which torchrun reports as a failed
    run. Every file is closed by now, so flush stdio and leave at once with os._exit.
    """
    if _watchdog is not None:
        _watchdog.finish()
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
