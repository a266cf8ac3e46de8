"""Start the real `manifold` binary for conformance tests.

    gw = Gateway(protocols=["kafka"]).start()
    port = gw.port("kafka")
    gw.kill(); gw.restart()     # SIGKILL, then start again on the same ports and data
    gw.stop()                   # SIGTERM and wait for a clean exit

Every listener gets a free loopback port; the data directory is a fresh
temporary directory. The binary is `$MANIFOLD_BIN`, else
`target/release/manifold` under the repository root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# protocol -> [(listener name, config key)]
LISTENERS = {
    "kafka": [("kafka", "listen")],
    "mqtt": [("mqtt", "listen"), ("mqtt-ws", "ws_listen")],
    "amqp": [("amqp", "listen")],
    "echo": [("echo", "listen")],
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def binary() -> Path:
    b = os.environ.get("MANIFOLD_BIN")
    return Path(b).resolve() if b else ROOT / "target" / "release" / "manifold"


class Gateway:
    def __init__(self, protocols, options=None, extra_toml: str = "", broker=None, log_level="info"):
        """`options`: {"kafka": {"key": value}} merged into handler sections;
        `broker`: {"key": value} for [broker]; `extra_toml`: appended verbatim
        (must not repeat a section written here)."""
        self.protocols = list(protocols)
        self.options = options or {}
        self.broker = broker or {}
        self.extra_toml = extra_toml
        self.log_level = log_level
        self.workdir = Path(tempfile.mkdtemp(prefix="manifold-conf-"))
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "manifold.toml"
        self.log_path = self.workdir / "manifold.log"
        self.ports = {"admin": free_port()}
        for p in self.protocols:
            for name, _ in LISTENERS.get(p, [(p, "listen")]):
                self.ports[name] = free_port()
        self.proc: subprocess.Popen | None = None
        self._log = None

    # ---- configuration ----
    def config_text(self) -> str:
        lines = [
            f"protocols = {toml_value(self.protocols)}",
            f"data_dir = {toml_value(str(self.data_dir))}",
            f"log_level = {toml_value(self.log_level)}",
            "shutdown_grace_ms = 3000",
            "",
            "[admin]",
            f'listen = "127.0.0.1:{self.ports["admin"]}"',
            "",
            "[broker]",
        ]
        for k, v in self.broker.items():
            lines.append(f"{k} = {toml_value(v)}")
        for p in self.protocols:
            lines += ["", f"[{p}]"]
            for name, key in LISTENERS.get(p, [(p, "listen")]):
                lines.append(f'{key} = "127.0.0.1:{self.ports[name]}"')
            for k, v in self.options.get(p, {}).items():
                lines.append(f"{k} = {toml_value(v)}")
        return "\n".join(lines) + "\n" + self.extra_toml + "\n"

    def port(self, name: str) -> int:
        return self.ports[name]

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    # ---- lifecycle ----
    def start(self, timeout: float = 30.0) -> "Gateway":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("gateway already running")
        self.config_path.write_text(self.config_text())
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n==== start {time.strftime('%H:%M:%S')} ====\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [str(binary()), "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"manifold exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"manifold not ready after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown work at all."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the graceful shutdown; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                self._close_log()
                raise RuntimeError("manifold did not stop within the timeout")
        self._close_log()
        return self.proc.returncode

    def restart(self, kill: bool = False) -> "Gateway":
        self.kill() if kill else self.stop()
        return self.start()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- admin API helpers ----
    def admin(self, method: str, path: str, body: bytes | None = None):
        """Returns (status, body bytes)."""
        req = urllib.request.Request(self.admin_url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()
