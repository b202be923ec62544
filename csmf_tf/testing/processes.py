"""The server and the exporter as child processes, as in production (``python -m pipelines.*``).

Used by the soak and fuzz benchmarks (and so by the tests that run them): a server in its own process
can be SIGTERMed, watched through ``/proc`` and killed without taking the load generator with it.
Children run from the repository root with it on ``PYTHONPATH``, so ``pipelines`` resolves from a
checkout as well as from an installed package.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (all bound at once, so no two are the same), for
    clusters whose addresses must be known before their processes start."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env() -> dict[str, str]:
    # Quiet TF's C++ start-up chatter in the children; PYTHONPATH so ``-m pipelines.*`` resolves.
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")


def export_demo(base: Path, model_name: str, num_items: int, num_users: int, dim: int, seed: int,
                log_path: Path, timeout_s: float = 600.0) -> tuple[Path, float, float]:
    """Run ``python -m pipelines.export --demo`` (a real, atomic export) in a subprocess.

    Returns ``(version dir, seconds until the version directory appeared, seconds until the exporter
    exited)``: the exporter's interpreter teardown comes after the rename, so the first figure is when
    the server could first see the version.
    """
    t0 = time.monotonic()
    model_dir = base / model_name
    before = {p.name for p in model_dir.iterdir()} if model_dir.is_dir() else set()
    appeared: float | None = None
    with open(log_path, "ab") as log, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.export", "--demo", "--base_path", str(base), "--model_name",
             model_name, "--num_items", str(num_items), "--num_users", str(num_users), "--dim", str(dim),
             "--seed", str(seed), "--k_max", "50"],
            cwd=REPO, env=_env(), stdout=out, stderr=log)
        while proc.poll() is None:
            if appeared is None and model_dir.is_dir() and any(
                    p.isdigit() and p not in before for p in os.listdir(model_dir)):
                appeared = time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"export timed out after {timeout_s}s")
            time.sleep(0.05)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"export failed ({proc.returncode}); see {log_path}")
    line = next(l for l in text.splitlines() if l.startswith("exported "))
    took = time.monotonic() - t0
    return Path(line.split()[1]), appeared if appeared is not None else took, took


class ServerProcess:
    """``python -m pipelines.serve`` on free ports, its output in a log file.

    ``model_base_path`` is the model's own directory (its version subdirectories), as the server takes
    it; with ``model_base_path=None`` and ``model_name=None``, ``extra_args`` say what to serve (e.g.
    ``["--model_config_file", path]``). ``cwd``: where the server runs (relative paths resolve there).
    """

    def __init__(self, model_base_path: str | os.PathLike | None, model_name: str | None, workdir: Path,
                 extra_args: list[str] | None = None, start_timeout_s: float = 300.0, cwd: Path = REPO) -> None:
        self.port_file = workdir / f"ports-{time.monotonic_ns()}.json"
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "ab")
        model = [] if model_base_path is None else ["--model_base_path", str(model_base_path)]
        model += [] if model_name is None else ["--model_name", model_name]
        cmd = [sys.executable, "-m", "pipelines.serve", *model, "--port", "0", "--rest_api_port", "0",
               "--port_file", str(self.port_file), "--log_level", "WARNING", *(extra_args or [])]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout_s
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not start; see {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)
        ports = json.loads(self.port_file.read_text())
        self.pid: int = ports["pid"]
        self.grpc_target = f"127.0.0.1:{ports['grpc_port']}"
        self.rest_host, self.rest_port = "127.0.0.1", int(ports["rest_port"])

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output."""
        self._log.flush()
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    def terminate(self, timeout_s: float = 120.0) -> int | None:
        """SIGTERM (graceful drain); returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (only this process, by pid)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        self._log.close()


def proc_status(pid: int) -> dict[str, float]:
    """RSS (MB), threads and open file descriptors of a process, from /proc."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024.0
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out
