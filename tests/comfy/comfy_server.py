"""A headless ComfyUI server for tests: start, talk JSON over loopback HTTP, stop by PID."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).resolve().parent / "stubs"


def comfy_env(comfyui: str) -> dict[str, str]:
    """Environment for a ComfyUI process: ComfyUI importable, and the torchvision stub when no torchvision is
    installed (a real one is left in charge). The plugin is found in custom_nodes or loaded by path."""
    env = dict(os.environ)
    parts = [comfyui] if importlib.util.find_spec("torchvision") else [str(STUBS), comfyui]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """``main.py --cpu --listen 127.0.0.1`` with ``base`` as its base directory (plugin in custom_nodes)."""

    def __init__(self, comfyui: str, base: Path, log: Path) -> None:
        self.comfyui = comfyui
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--base-directory",
                str(base),
                "--disable-auto-launch",
                "--dont-print-server",
            ],
            cwd=comfyui,
            env=comfy_env(comfyui),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue an API-format prompt and wait for it; returns its history entry (raises on a refused prompt)."""
        status, answer = self.post("/prompt", {"prompt": prompt})
        if status != 200:
            raise PromptRefused(answer)
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_text()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class PromptRefused(Exception):
    """The server refused a prompt at validation; ``answer`` is its JSON reply."""

    def __init__(self, answer: dict) -> None:
        super().__init__(json.dumps(answer)[:2000])
        self.answer = answer


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message of a history entry, or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None
