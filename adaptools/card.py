"""Model cards: README.md for an output folder, with Hub front matter (huggingface_hub's ModelCardData),
the recipe (inputs with sha256, parameters, adaptools version) and the per-module summary.

Front matter: `library_name` peft for adapters, transformers for models; `tags` adaptools, the operation
(and lora for adapters); `base_model` only when it is a Hub repo id (a local path is shown in the text
instead, since the Hub rejects it); `license` (with `license_name`/`license_link`) passed through when
the inputs' own README.md declare one and all that declare one agree.

Privacy: a card holds no local path. Inputs are named by their file or folder name; a base model that is not a
Hub id (a local folder) is named by its last path component only.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .formats.peft import CONFIG_NAME
from .recipe import RECIPE_NAME

CARD_NAME = "README.md"
CARD_ROWS = 100
"""At most this many per-module rows in the card; the recipe keeps them all."""
LIBRARY = {"adapter": "peft", "model": "transformers"}
LICENSE_KEYS = ("license", "license_name", "license_link")


def hub_model_id(name: object) -> str | None:
    """`name` when it is a string that can be a Hub model id and is not a local path, else None."""
    if not isinstance(name, str) or not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def input_metadata(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Front matter of each input folder's README.md ({} where there is none or it does not parse)."""
    metadata = []
    for path in paths:
        readme = Path(path) / CARD_NAME
        try:
            metadata.append((metadata_load(readme) or {}) if readme.is_file() else {})
        except (yaml.YAMLError, UnicodeDecodeError):
            metadata.append({})
    return metadata


def adapter_base_model(folder: str | os.PathLike) -> str | None:
    """base_model_name_or_path of the PEFT adapter folder `folder` (None when it has no adapter_config.json)."""
    config = Path(folder) / CONFIG_NAME
    return json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None


def agreed(values: Iterable) -> object | None:
    """The one distinct non-empty value, or None when there is none or they disagree."""
    distinct = {json.dumps(v, sort_keys=True) for v in values if v}
    return json.loads(distinct.pop()) if len(distinct) == 1 else None


def card_data(kind: str, operation: str, base_model: str | None, inputs_meta: Sequence[Mapping],
              license: str | None = None) -> ModelCardData:
    """Front matter: library_name, tags, base_model (a Hub id), license (given, or agreed by the inputs)."""
    licensing = {"license": license} if license else agreed(
        {k: m[k] for k in LICENSE_KEYS if m.get(k)} for m in inputs_meta
    ) or {}
    base = hub_model_id(base_model) or hub_model_id(agreed(m.get("base_model") for m in inputs_meta))
    tags = ["adaptools", operation] + (["lora"] if kind == "adapter" else [])
    return ModelCardData(base_model=base, library_name=LIBRARY[kind], tags=tags, **licensing)


def model_card(recipe: Mapping, title: str, base_model: str | None = None, license: str | None = None,
               inputs_meta: Sequence[Mapping] = ()) -> str:
    """README.md text for the output of `recipe` (pure: the inputs' front matter is passed in)."""
    data = card_data(recipe["kind"], recipe["operation"], base_model, inputs_meta, license)
    command = " ".join(recipe["command"])
    lines = [
        f"# {title}", "",
        f"{'Adapter' if recipe['kind'] == 'adapter' else 'Model'} written by `adaptools {command}` "
        f"(adaptools {recipe['adaptools_version']}).", "",
    ]
    if base_model and not data.base_model:
        lines += [f"Base model: a local folder named `{local_name(base_model)}`.", ""]
    licenses = sorted({str(m["license"]) for m in inputs_meta if m.get("license")})
    if len(licenses) > 1 and not license:
        lines += [f"The inputs declare different licenses ({', '.join(licenses)}); none is set here.", ""]
    lines += ["## Recipe", "", "Inputs (sha256 of the file, or of the folder's per-file sha256 list):", ""]
    lines += markdown_table(["parameter", "input", "sha256"], [
        (e["param"], input_label(e) + (f" ({'Hub' if 'repo_id' in e else 'folder'}, {len(e['files'])} files)"
                                       if "files" in e else ""), f"`{e['sha256']}`") for e in recipe["inputs"]
    ])
    input_params = {e["param"] for e in recipe["inputs"]}
    params = [(k, cell(v)) for k, v in recipe["params"].items() if k not in input_params and v not in (None, False, [])]
    lines += ["", "Parameters:", ""] + markdown_table(["parameter", "value"], params)
    lines += ["", "Reproduce from the same inputs (their sha256 are checked first):", "", "```",
              f"adaptools replay {RECIPE_NAME} -o OUTPUT", "```"]
    report = list(recipe.get("report", ()))
    if report:
        columns = list(dict.fromkeys(key for row in report for key in row))
        lines += ["", "## Per-module report", ""]
        lines += markdown_table(columns, [[cell(row.get(c)) for c in columns] for row in report[:CARD_ROWS]])
        if len(report) > CARD_ROWS:
            lines += ["", f"First {CARD_ROWS} of {len(report)} modules; all are in {RECIPE_NAME}."]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def local_name(path: str) -> str:
    """The last component of a local path (what a card may show of it)."""
    return Path(path.replace("\\", "/")).name or path


def input_label(entry: Mapping) -> str:
    """How the card names a recipe input: ORG/NAME[/path]@<commit, 12 digits> for a Hub input, else its name."""
    if "repo_id" in entry:
        path = f"/{entry['path_in_repo']}" if entry.get("path_in_repo") else ""
        return cell(f"{entry['repo_id']}{path}@{str(entry['revision'])[:12]}")
    return cell(Path(entry["path"]).name)


def cell(value: object) -> str:
    """A table cell: floats to 4 significant digits, strings as they are, the rest as JSON; `|` escaped."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, str):
        text = value
    else:
        text = "" if value is None else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """Lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_card(text: str, folder: str | os.PathLike) -> Path:
    """Write README.md into the (staged) output `folder`, replacing one copied there (a base model's card) without
    writing through it; returns its path."""
    target = Path(folder) / CARD_NAME
    target.unlink(missing_ok=True)
    with open(target, "x", encoding="utf-8") as f:
        f.write(text)
    return target
