"""The plugin loads through ComfyUI's own loader; /object_info lists every node with full tooltips."""

from __future__ import annotations

import json
from pathlib import Path

NODE_IDS = (
    "DiffBiasLoadSAE",
    "DiffBiasTrainSAE",
    "DiffBiasAttributeFeatures",
    "DiffBiasApplyIntervention",
    "DiffBiasSaveFeatures",
    "DiffBiasLoadFeatures",
    "DiffBiasPreviewFeatures",
    "DiffBiasTrainClassifier",
    "DiffBiasTrainClassifierFromImages",
    "DiffBiasSaveClassifier",
    "DiffBiasLoadClassifier",
    "DiffBiasMeasureBias",
    "DiffBiasCalibrateIntervention",
    "DiffBiasLoadToyWorld",
    "DiffBiasToyWorldOracle",
)


def test_every_node_is_listed(server):
    info = server.get("/object_info")
    missing = [node for node in NODE_IDS if node not in info]
    assert not missing, f"not listed by /object_info: {missing}; server log:\n{server.log_text()[-3000:]}"
    ours = sorted(name for name in info if name.startswith("DiffBias"))
    assert ours == sorted(NODE_IDS), f"unexpected DiffBias nodes: {set(ours) ^ set(NODE_IDS)}"


def test_names_categories_and_tooltips(server):
    info = server.get("/object_info")
    problems = []
    for node_id in NODE_IDS:
        node = info[node_id]
        if not node["display_name"].endswith("(DiffBias)"):
            problems.append(f"{node_id}: display name {node['display_name']!r}")
        if not node["category"].startswith("diffbias/"):
            problems.append(f"{node_id}: category {node['category']!r}")
        if not node.get("description"):
            problems.append(f"{node_id}: no description")
        for group in ("required", "optional"):
            for name, spec in node["input"].get(group, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if not options.get("tooltip"):
                    problems.append(f"{node_id}: input {name!r} has no tooltip")
        tooltips = node.get("output_tooltips") or []
        for i, name in enumerate(node["output_name"]):
            if i >= len(tooltips) or not tooltips[i]:
                problems.append(f"{node_id}: output {name!r} has no tooltip")
    assert not problems, "\n".join(problems)


def test_custom_types(server):
    info = server.get("/object_info")
    assert "DIFFBIAS_SAE" in info["DiffBiasLoadSAE"]["output"]
    assert info["DiffBiasApplyIntervention"]["input"]["required"]["sae"][0] == "DIFFBIAS_SAE"
    assert info["DiffBiasApplyIntervention"]["input"]["required"]["features"][0] == "DIFFBIAS_FEATURES"
    assert info["DiffBiasApplyIntervention"]["output"] == ["MODEL"]


def test_sae_folder_is_listed(server):
    info = server.get("/object_info/DiffBiasLoadSAE")["DiffBiasLoadSAE"]
    choices = info["input"]["required"]["sae_name"]
    options = choices[1].get("options", choices[0]) if len(choices) > 1 else choices[0]
    assert "sd15_hspace.safetensors" in options
    assert "sparsify_sd15/" in options, "a published layout folder is listed as 'name/'"
    assert "sparsify_sd15/sae.safetensors" not in options
    assert options[-1] == "toy_world/toy_sae.safetensors", (
        "the shipped toy SAE is listed after the user's files"
    )
    assert not [name for name in options if name.endswith(".features.safetensors")]


def test_imported_folder_loads_with_a_hook_given(server):
    from .comfy_server import execution_error

    prompt = {
        "1": {
            "class_type": "DiffBiasLoadSAE",
            "inputs": {"sae_name": "sparsify_sd15/", "hook_override": "unet.output.1"},
        },
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 4]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
    }
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["outputs"]["2"]["text"] == ["unet.output.1"]
    assert entry["outputs"]["3"]["text"] == ["1280"]


def test_shipped_toy_files_are_listed_and_load_without_an_sae_folder_entry(server):
    from .comfy_server import execution_error

    info = server.get("/object_info/DiffBiasLoadFeatures")["DiffBiasLoadFeatures"]
    choices = info["input"]["required"]["features_name"]
    options = choices[1].get("options", choices[0]) if len(choices) > 1 else choices[0]
    assert options[-1] == "toy_world/toy_world.colour.features.safetensors"
    prompt = {
        "1": {"class_type": "DiffBiasLoadSAE", "inputs": {"sae_name": "toy_world/toy_sae.safetensors"}},
        "2": {"class_type": "DiffBiasLoadFeatures",
              "inputs": {"features_name": "toy_world/toy_world.colour.features.safetensors"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 5]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }  # fmt: skip
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["outputs"]["3"]["text"] == ["toy"]
    assert entry["outputs"]["4"]["text"] == ["red,green,blue"]


# ------------------------------------------------------------------- input order: a public API
INPUTS_FILE = Path(__file__).resolve().parent / "node_inputs.json"
"""Every node's inputs as released: name, type and what a saved workflow depends on, in order."""
COMFY_OPTIONS = ("sampler_name", "scheduler")
"""Combos whose options are ComfyUI's own lists (not recorded: they follow the ComfyUI version)."""


def input_signature(spec: dict) -> dict[str, list]:
    """Per input group, in input order: [name, type, facts] with facts the default, min, max, the control
    widget after an INT, and the options of a combo with a default (file lists have none). UI-format workflows
    store widget values by position, so a change of any of these breaks the workflows users saved."""
    order = spec.get("input_order") or {g: list(spec["input"].get(g, {})) for g in ("required", "optional")}
    signature = {}
    for group, names in order.items():
        rows = []
        for name in names:
            entry = spec["input"][group][name]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            kind = "COMBO" if isinstance(entry[0], list) else entry[0]
            facts = {
                key: options[key]
                for key in ("default", "min", "max", "control_after_generate")
                if key in options
            }
            if kind == "COMBO" and "default" in options and name not in COMFY_OPTIONS:
                facts["options"] = list(
                    options.get("options", entry[0] if isinstance(entry[0], list) else [])
                )
            rows.append([name, kind, facts])
        if rows:
            signature[group] = rows
    return signature


def changed_inputs(released: dict, info: dict) -> list[str]:
    """What differs between the released inputs (``node_inputs.json``) and /object_info, one line each."""
    problems = []
    for node_id in NODE_IDS:
        now = input_signature(info[node_id])
        if node_id not in released:
            problems.append(f"{node_id} is not in {INPUTS_FILE.name}; add it as released:\n"
                            f'"{node_id}": {json.dumps(now)}')  # fmt: skip
            continue
        for group, rows in released[node_id].items():
            current = now.get(group, [])
            for i, row in enumerate(rows):
                found = current[i] if i < len(current) else None
                if found != row:
                    problems.append(f"{node_id} {group} input {i}: released {row}, found {found}")
    return problems


def test_inputs_keep_their_names_order_and_defaults(server):
    """Inputs may be appended at the end of a group; none may be renamed, reordered, retyped or re-defaulted."""
    problems = changed_inputs(json.loads(INPUTS_FILE.read_text()), server.get("/object_info"))
    assert not problems, "\n".join(problems)
