"""The tests of this folder exercise the plugin as ComfyUI loads it, with the plugin's own core."""

from __future__ import annotations

import sys

from ..comfy_server import REPO
from ..test_object_info import NODE_IDS


def test_nodes_and_tests_use_the_plugins_own_core(plugin, core):
    assert core.__name__ == f"{plugin.package.__name__}.diffbias_core", core.__name__
    assert core.__file__ == str(REPO / "diffbias_core" / "__init__.py"), core.__file__
    patching = plugin.module("nodes.intervention_run")
    assert patching.SparseAutoencoder is core.SparseAutoencoder, "the nodes use another core than plugin.core"
    assert "diffbias_core" not in sys.modules, (
        f"a second, top-level diffbias_core ({sys.modules['diffbias_core'].__file__}) was imported in the "
        "ComfyUI process: tests must use plugin.core"
    )


def test_every_node_is_registered(plugin):
    assert sorted(plugin.node_classes) == sorted(NODE_IDS), f"registered {sorted(plugin.node_classes)}"
