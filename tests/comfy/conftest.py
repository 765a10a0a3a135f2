"""Fixtures for tests against a real ComfyUI, found through the environment variable COMFYUI_PATH.

Without it every test here is skipped with the reason printed. With it, a test here that skips is
reported as a failure that names the test and the skip reason: nothing may silently skip against a
ComfyUI (CI sets COMFYUI_PATH). The random-weight SD1.5 checkpoint
(2 GB) is built once with ComfyUI's own classes and cached in $COMFYUI_TEST_CACHE (default: a
``diffbias_comfy_cache`` folder in the system temp dir), outside the repository; so is the random-weight CLIP
ViT-L/14 image encoder (600 MB) of the ``clip_vision`` fixture, built only for the tests that use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .comfy_server import REPO, ComfyServer, comfy_env

COMFYUI = os.environ.get("COMFYUI_PATH", "")
SKIP_REASON = (
    "COMFYUI_PATH is not set (or is not a ComfyUI checkout with main.py): the node tests need a real "
    "ComfyUI; set COMFYUI_PATH=/path/to/ComfyUI to run them"
)
CHECKPOINT = "diffbias_random_sd15.safetensors"
CLIP_VISION = "diffbias_random_clip_vit_l.safetensors"
"""A random-weight CLIP ViT-L/14 image encoder (``make_clip_vision.py``), for the classifier nodes."""
HERE = Path(__file__).resolve().parent


def comfyui_available() -> bool:
    return bool(COMFYUI) and (Path(COMFYUI) / "main.py").is_file()


def _skip_reason() -> str:
    if COMFYUI and not comfyui_available():
        return f"COMFYUI_PATH={COMFYUI} has no main.py: point it at a ComfyUI checkout"
    return SKIP_REASON


NO_CHROMIUM_PREFIX = "no Chromium for the browser test: "
"""Start of the one skip reason allowed with COMFYUI_PATH set, outside CI: the browser test runs where a
Chromium is found (``test_frontend.chromium``); with the environment variable CI set it fails instead."""


def _is_node_test(item) -> bool:
    return HERE in Path(str(item.fspath)).resolve().parents


def pytest_collection_modifyitems(config, items):
    if comfyui_available():
        return
    skip = pytest.mark.skip(reason=_skip_reason())
    for item in items:
        if _is_node_test(item):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """With COMFYUI_PATH set, a node test that skips fails, naming the test and the skip reason."""
    report = yield
    if COMFYUI and report.skipped and _is_node_test(item) and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if NO_CHROMIUM_PREFIX in reason and not os.environ.get("CI"):
            return report
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped ({report.when}) although COMFYUI_PATH is set ({COMFYUI}): {reason}\n"
            "With COMFYUI_PATH set every node test must run; unset it to skip the node tests."
        )
    return report


@pytest.fixture(scope="session")
def comfyui() -> str:
    if not comfyui_available():
        pytest.skip(_skip_reason())
    return COMFYUI


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    folder = Path(
        os.environ.get("COMFYUI_TEST_CACHE") or Path(tempfile.gettempdir()) / "diffbias_comfy_cache"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def sd15_checkpoint(comfyui, cache_dir) -> Path:
    """A random-weight SD1.5-architecture checkpoint written by comfy.sd.save_checkpoint (cached)."""
    path = cache_dir / CHECKPOINT
    if not path.is_file():
        subprocess.run(
            [sys.executable, str(HERE / "make_checkpoint.py"), str(path)],
            cwd=comfyui,
            env=comfy_env(comfyui),
            check=True,
            timeout=900,
        )
    return path


def run_comfy_script(comfyui: str, script: str, *args: str, timeout: float = 900) -> str:
    """Run a script of this folder in a ComfyUI process; returns its stdout (raises with its output)."""
    result = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        cwd=comfyui,
        env=comfy_env(comfyui),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result.stdout


@pytest.fixture(scope="session")
def server_base(tmp_path_factory, sd15_checkpoint) -> Path:
    """A ComfyUI base directory: the plugin in custom_nodes, the checkpoint, an SAE folder with test files."""
    from .sae_files import write_error_files, write_example_files, write_sparsify_folder

    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "diffbias").symlink_to(REPO, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CHECKPOINT).symlink_to(sd15_checkpoint)
    write_example_files(base / "models" / "sae")
    write_error_files(base / "models" / "sae")
    write_sparsify_folder(base / "models" / "sae")
    return base


@pytest.fixture(scope="session")
def clip_vision(comfyui, cache_dir, server_base) -> str:
    """The random ViT-L image encoder (cached beside the checkpoint), linked into the server's models/clip_vision."""
    path = cache_dir / CLIP_VISION
    if not path.is_file():
        subprocess.run([sys.executable, str(HERE / "make_clip_vision.py"), str(path)], cwd=comfyui,
                       env=comfy_env(comfyui), check=True, timeout=900)  # fmt: skip
    folder = server_base / "models" / "clip_vision"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / CLIP_VISION).exists():
        (folder / CLIP_VISION).symlink_to(path)
    return CLIP_VISION


@pytest.fixture(scope="session")
def server(comfyui, server_base, tmp_path_factory):
    """A running headless ComfyUI (CPU, loopback) with the plugin loaded."""
    log = tmp_path_factory.mktemp("comfy_log") / "server.log"
    srv = ComfyServer(comfyui, server_base, log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
