"""Workflow JSON: build the UI (LiteGraph) format from a compact graph, convert UI format to API format.

Both use a server's ``/object_info`` for input order, widget kinds and output types, the way the
frontend does: widget values are stored in input order, an INT with ``control_after_generate`` is
followed by its control value ("fixed"), and linked inputs take no widget value.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_INPUTS = {"PreviewAny": {"preview": ""}}
"""Inputs the frontend (1.27.10) adds on its own to core nodes, not in /object_info and not saved in the
workflow, with the value its ``graphToPrompt()`` sends (Preview Any's read-only text box; the server ignores it)."""
NODE_WIDTH = 320
GAP = 40
"""Vertical space left between two nodes of a column."""


def node_height(widgets: int, linked_inputs: int, spec: dict) -> int:
    """Saved height of a node: the frontend draws the input and output sockets side by side, then the
    widgets (a multiline text widget is taller), so the taller socket column counts."""
    sockets = max(linked_inputs, len(spec["output"]))
    multiline = sum(
        1
        for group in ("required", "optional")
        for entry in spec["input"].get(group, {}).values()
        if len(entry) > 1 and isinstance(entry[1], dict) and entry[1].get("multiline")
    )
    return 40 + 24 * sockets + 26 * widgets + 60 * multiline


def _ordered_inputs(spec: dict) -> list[tuple[str, list]]:
    order = spec.get("input_order") or {g: list(spec["input"].get(g, {})) for g in ("required", "optional")}
    return [
        (name, spec["input"][group][name])
        for group in ("required", "optional")
        for name in order.get(group, [])
    ]


def is_widget(input_spec: list) -> bool:
    kind = input_spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control(name: str, input_spec: list) -> bool:
    """True when the frontend adds a control widget after this input (an explicit flag, else seed names)."""
    options = input_spec[1] if len(input_spec) > 1 else {}
    flag = options.get("control_after_generate")
    if flag is None:
        return input_spec[0] == "INT" and name in ("seed", "noise_seed")
    return bool(flag)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt from a UI-format workflow (muted and bypassed nodes are left out)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        spec = object_info[node["type"]]
        linked = {slot["name"]: slot.get("link") for slot in node.get("inputs", [])}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        index = 0
        for name, input_spec in _ordered_inputs(spec):
            link = linked.get(name)
            if link is not None:
                origin = links[link]
                inputs[name] = [str(origin[1]), origin[2]]
            if is_widget(input_spec):
                if link is None and index < len(values):
                    inputs[name] = values[index]
                index += 1 + (1 if has_control(name, input_spec) else 0)
        inputs.update(FRONTEND_INPUTS.get(node["type"], {}))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def build_ui(graph: list[dict], object_info: dict) -> dict:
    """UI-format workflow from nodes ``{"id", "type", "pos", "widgets": {name: value}, "links": {input:
    (node id, output name)}}``; unset widgets take their defaults (combos: the first option)."""
    by_id = {node["id"]: node for node in graph}
    links: list[list] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes = []
    for order, node in enumerate(graph):
        spec = object_info[node["type"]]
        inputs, values = [], []
        for name, input_spec in _ordered_inputs(spec):
            source = node.get("links", {}).get(name)
            if source is not None:
                origin = by_id[source[0]]
                slot = object_info[origin["type"]]["output_name"].index(source[1])
                link_id = len(links) + 1
                kind = object_info[origin["type"]]["output"][slot]
                links.append([link_id, origin["id"], slot, node["id"], len(inputs), kind])
                out_links.setdefault((origin["id"], slot), []).append(link_id)
                inputs.append(
                    {
                        "name": name,
                        "type": input_spec[0] if not isinstance(input_spec[0], list) else "COMBO",
                        "link": link_id,
                    }
                )
            if is_widget(input_spec):  # a linked widget keeps its value, as the frontend does
                values.append(_widget_value(node, name, input_spec))
                if has_control(name, input_spec):
                    values.append("fixed")
        ui_nodes.append(
            {
                "id": node["id"],
                "type": node["type"],
                "pos": list(node["pos"]),
                "size": list(node.get("size", (NODE_WIDTH, node_height(len(values), len(inputs), spec)))),
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": [],
                "properties": {"Node name for S&R": node["type"]},
                "widgets_values": values,
            }
        )
        if node.get("title"):
            ui_nodes[-1]["title"] = node["title"]
    for ui_node in ui_nodes:
        spec = object_info[ui_node["type"]]
        ui_node["outputs"] = [
            {
                "name": name,
                "type": kind,
                "links": out_links.get((ui_node["id"], slot), []),
                "slot_index": slot,
            }
            for slot, (name, kind) in enumerate(zip(spec["output_name"], spec["output"], strict=True))
        ]
    return {
        "last_node_id": max(node["id"] for node in graph),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def _widget_value(node: dict, name: str, input_spec: list):
    if name in node.get("widgets", {}):
        return node["widgets"][name]
    options = input_spec[1] if len(input_spec) > 1 else {}
    if "default" in options:
        return options["default"]
    choices = input_spec[0] if isinstance(input_spec[0], list) else options.get("options", [])
    return choices[0] if choices else None


def stack_columns(workflow: dict) -> dict:
    """Move nodes down so that none overlaps the one above it in its column (same x), keeping their order."""
    columns: dict[float, list[dict]] = {}
    for node in workflow["nodes"]:
        columns.setdefault(node["pos"][0], []).append(node)
    for nodes in columns.values():
        nodes.sort(key=lambda node: node["pos"][1])
        for above, node in zip(nodes, nodes[1:], strict=False):
            bottom = above["pos"][1] + above["size"][1] + GAP
            node["pos"][1] = max(node["pos"][1], bottom)
    return workflow
