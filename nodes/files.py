"""Where the plugin's files live: ComfyUI's ``models/sae`` folder (SAEs, and feature sets beside them), and
``models/diffbias_classifiers`` (bias classifiers).

SAE entries are native SAE files (``name.safetensors``) and published layout folders (``name/``: a
``cfg.json`` with ``sae.safetensors`` for sparsify and DiffLens, ``sae_weights.safetensors`` for SAELens),
which load as a whole. Feature sets are ``<name>.features.safetensors`` files in the folder of the
SAE they were made for; the SAE list leaves them out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths

from ..diffbias_core.sae.formats import check_writable_name
from ..diffbias_core.sae.importers import WEIGHT_FILES
from ..diffbias_core.toy.demo import FEATURES_FILE as TOY_FEATURES_FILE
from ..diffbias_core.toy.dissect import SAE_FILE as TOY_SAE_FILE
from ..diffbias_core.toy.train import WEIGHTS_DIR as TOY_WEIGHTS_DIR

SAE_FOLDER = "sae"
"""ComfyUI model folder name (``models/sae``)."""
FEATURES_SUFFIX = ".features.safetensors"
"""File name ending of feature-set files."""
SAE_SUFFIX = ".safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]*$")
SHIPPED_PREFIX = "toy_world/"
"""List prefix of the files shipped with the plugin (the toy world's SAE and features), listed after the user's."""
SHIPPED_SAES = (SHIPPED_PREFIX + TOY_SAE_FILE,)
SHIPPED_FEATURES = (SHIPPED_PREFIX + TOY_FEATURES_FILE,)


def shipped_path(file_name: str) -> str:
    """Full path of a file shipped in the plugin's toy weights folder."""
    return str(TOY_WEIGHTS_DIR / file_name)


def is_shipped(name: str) -> bool:
    """True for a list entry that names a shipped file (``toy_world/...``)."""
    return name in SHIPPED_SAES or name in SHIPPED_FEATURES


def register_folder() -> None:
    """Register ``models/sae`` (first) for ``.safetensors`` files; keeps folders other config added."""
    folder_paths.add_model_folder_path(
        SAE_FOLDER, os.path.join(folder_paths.models_dir, SAE_FOLDER), is_default=True
    )
    paths, extensions = folder_paths.folder_names_and_paths[SAE_FOLDER]
    folder_paths.folder_names_and_paths[SAE_FOLDER] = (paths, set(extensions) | {SAE_SUFFIX})


CLASSIFIER_FOLDER = "diffbias_classifiers"
"""ComfyUI model folder name of bias classifiers (``models/diffbias_classifiers``)."""


def register_classifier_folder() -> None:
    """Register ``models/diffbias_classifiers`` (first) for ``.safetensors`` classifier files."""
    folder_paths.add_model_folder_path(
        CLASSIFIER_FOLDER, os.path.join(folder_paths.models_dir, CLASSIFIER_FOLDER), is_default=True
    )
    paths, extensions = folder_paths.folder_names_and_paths[CLASSIFIER_FOLDER]
    folder_paths.folder_names_and_paths[CLASSIFIER_FOLDER] = (paths, set(extensions) | {SAE_SUFFIX})


def classifier_choices() -> list[str]:
    """Classifier files (relative names) for the Load Bias Classifier combo."""
    if CLASSIFIER_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return folder_paths.get_filename_list(CLASSIFIER_FOLDER)


def resolve_classifier(name: str) -> str:
    """Full path of a listed classifier file; FileNotFoundError saying where it was looked for."""
    path = folder_paths.get_full_path(CLASSIFIER_FOLDER, name)
    if path is None:
        folders = folder_paths.get_folder_paths(CLASSIFIER_FOLDER)
        raise FileNotFoundError(
            f"classifier {name!r} is not in the classifier folders {folders}; train one with 'Train Bias "
            "Classifier (DiffBias)' and save it with 'Save Bias Classifier (DiffBias)', or refresh the list ('r')"
        )
    return path


def new_classifier_path(name: str) -> str:
    """Where a classifier called ``name`` is written: the default classifier folder (created if missing)."""
    name = check_name(name, "file name").removesuffix(SAE_SUFFIX)
    folder = folder_paths.get_folder_paths(CLASSIFIER_FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name + SAE_SUFFIX)


def sae_folders() -> list[str]:
    """The registered SAE folders, default first."""
    return folder_paths.get_folder_paths(SAE_FOLDER)


def _entries() -> list[str]:
    return (
        folder_paths.get_filename_list(SAE_FOLDER)
        if SAE_FOLDER in folder_paths.folder_names_and_paths
        else []
    )


def _layout_label(entry: str) -> str | None:
    """``folder/`` when ``entry`` is the weight file of a published layout folder (a ``cfg.json`` beside it),
    else None. Opens no file: a damaged one must not break the list (loading it names the defect)."""
    folder, base = os.path.split(entry)
    if not folder or base not in WEIGHT_FILES:
        return None
    path = folder_paths.get_full_path(SAE_FOLDER, entry)
    try:
        return (
            folder + "/"
            if path is not None and os.path.isfile(os.path.join(os.path.dirname(path), "cfg.json"))
            else None
        )
    except (OSError, ValueError):
        return None


def sae_choices() -> list[str]:
    """SAE entries (relative names; layout folders end in ``/``) for the Load SAE combo."""
    choices = []
    for name in _entries():
        if not name.endswith(FEATURES_SUFFIX):
            label = _layout_label(name) or name
            if label not in choices:
                choices.append(label)
    return choices + [name for name in SHIPPED_SAES if name not in choices]


def feature_choices() -> list[str]:
    """Feature-set files (relative names) for the Load Features combo; the shipped ones last."""
    names = [name for name in _entries() if name.endswith(FEATURES_SUFFIX)]
    return names + [name for name in SHIPPED_FEATURES if name not in names]


def missing_folder_message() -> str | None:
    """A message saying how to create the SAE folder when none of the registered ones exists."""
    folders = sae_folders() if SAE_FOLDER in folder_paths.folder_names_and_paths else []
    if any(os.path.isdir(folder) for folder in folders):
        return None
    where = folders[0] if folders else os.path.join(folder_paths.models_dir, SAE_FOLDER)
    return (
        f"the SAE folder {where} does not exist: create it and put SAE files (.safetensors, or a "
        "published SAE folder with its cfg.json) in it, or train one with 'Train Bias SAE (DiffBias)'"
    )


def resolve(name: str, what: str = "SAE") -> str:
    """Full path of a listed entry (a layout folder ``name/``: its weight file, which loads the folder);
    FileNotFoundError saying where it was looked for and what to do. Shipped entries resolve to the plugin's
    own files (a file of the same name in the user's folder is not consulted)."""
    if is_shipped(name):
        return shipped_path(name.removeprefix(SHIPPED_PREFIX))
    missing = missing_folder_message()
    if missing is not None:
        raise FileNotFoundError(missing)
    candidates = (
        [os.path.join(name.rstrip("/"), weights) for weights in WEIGHT_FILES]
        if name.endswith("/")
        else [name]
    )
    for candidate in candidates:
        path = folder_paths.get_full_path(SAE_FOLDER, candidate)
        if path is not None:
            return path
    raise FileNotFoundError(
        f"{what} {name!r} is not in the SAE folders {sae_folders()}; refresh the list (press 'r') and pick an "
        "existing entry"
    )


def check_name(name: str, what: str) -> str:
    """A plain file name (letters, digits, space, ``._+-``; no folders); ValueError otherwise."""
    name = name.strip()
    if not _NAME_RE.match(name) or name.endswith(".") or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not a plain file name: use letters, digits, spaces and ._+- only, "
            "without folders, e.g. 'sd15_middle'"
        )
    return name


def new_sae_path(name: str) -> str:
    """Where a trained SAE called ``name`` is written: the default SAE folder (created if missing)."""
    name = check_name(name, "file name").removesuffix(SAE_SUFFIX)
    if (name + SAE_SUFFIX).lower().endswith(FEATURES_SUFFIX):
        raise ValueError(
            f"file name {name!r}: names ending in '.features' are where feature sets live, and an SAE written there "
            f"would replace one; pick a name without '.features', e.g. {name[: -len('.features')] or 'my'}_sae"
        )
    folder = sae_folders()[0]
    check_writable_name(os.path.join(folder, f"{name}.cancelled-99{SAE_SUFFIX}"))  # longest form (free_path)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name + SAE_SUFFIX)


def free_path(path: str, tag: str) -> str:
    """``path`` with ``.<tag>`` before its suffix (``.<tag>-2``, ``-3``, ... when taken): a name no file has."""
    stem, suffix = path.removesuffix(SAE_SUFFIX), SAE_SUFFIX
    candidate, number = f"{stem}.{tag}{suffix}", 1
    while os.path.lexists(candidate):
        number += 1
        candidate = f"{stem}.{tag}-{number}{suffix}"
    return candidate


def features_path(sae_path: str, name: str) -> str:
    """Where a feature set called ``name`` for the SAE at ``sae_path`` is written: beside that SAE, or, for a
    shipped SAE (the plugin's folder is not written to), in the default SAE folder (created if missing)."""
    name = check_name(name, "file name").removesuffix(FEATURES_SUFFIX).removesuffix(SAE_SUFFIX)
    folder = os.path.dirname(os.path.abspath(sae_path))
    if Path(folder) == TOY_WEIGHTS_DIR:
        folder = sae_folders()[0]
        os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + FEATURES_SUFFIX)
    check_writable_name(path)
    return path


def display_name(path: str) -> str:
    """``path`` relative to the SAE folder that holds it (or the path itself)."""
    for folder in sae_folders():
        folder = os.path.abspath(folder)
        if os.path.abspath(path).startswith(folder + os.sep):
            return os.path.relpath(path, folder).replace(os.sep, "/")
    return path


__all__ = [
    "CLASSIFIER_FOLDER",
    "FEATURES_SUFFIX",
    "SHIPPED_FEATURES",
    "SHIPPED_SAES",
    "SAE_FOLDER",
    "check_name",
    "classifier_choices",
    "display_name",
    "feature_choices",
    "features_path",
    "free_path",
    "is_shipped",
    "missing_folder_message",
    "new_classifier_path",
    "new_sae_path",
    "register_classifier_folder",
    "register_folder",
    "resolve",
    "resolve_classifier",
    "sae_choices",
    "shipped_path",
]
