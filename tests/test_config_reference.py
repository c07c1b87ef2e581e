"""The config reference (workflow/docs/config.md) is rendered from the schema and kept up to date."""
from pathlib import Path

from peftbench.config import load_schema
from peftbench.config_reference import REGENERATE, reference, render, undocumented

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "workflow" / "docs" / "config.md"


def test_committed_reference_is_up_to_date():
    assert DOC.exists(), f"{DOC.relative_to(ROOT)} is missing; generate it with `{REGENERATE}`"
    assert DOC.read_text() == reference(load_schema()), (
        f"{DOC.relative_to(ROOT)} is out of date with workflow/schemas/config.schema.yaml; "
        f"regenerate it with `{REGENERATE}` (from the repository root) and commit it")


def test_every_method_option_is_documented():
    import dataclasses

    from peftbench.methods import METHOD_TABLE, get_method

    for info in METHOD_TABLE:
        for f in dataclasses.fields(get_method(info.name).options_cls):
            assert f.metadata.get("help"), f"method_options.{info.name}.{f.name} has no help sentence"
            assert f"`method_options.{info.name}.{f.name}`" in DOC.read_text()


def test_every_schema_property_has_a_description():
    assert undocumented(load_schema()) == [], "add a description to these schema properties"


SMALL = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "description": "toy config",
    "type": "object",
    "required": ["run"],
    "$defs": {
        "opt": {
            "type": "object",
            "properties": {
                "lr": {"type": "number", "exclusiveMinimum": 0, "description": "learning rate"},
                "mode": {"enum": ["fast", "slow"], "default": "fast", "description": "speed"},
            },
        },
    },
    "properties": {
        "run": {
            "type": "object",
            "default": {},
            "description": "run settings",
            "properties": {
                "steps": {"type": "integer", "minimum": 1, "maximum": 10, "default": 5, "description": "optimizer steps"},
                "name": {"type": ["string", "null"]},
            },
        },
        "tasks": {
            "type": "object",
            "description": "per-task options",
            "additionalProperties": {"$ref": "#/$defs/opt"},
        },
        "models": {"type": "object", "description": "name -> id", "additionalProperties": {"type": "string", "minLength": 1}},
    },
}


def _rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_render_small_schema():
    md = render(SMALL)
    assert md.splitlines()[0] == "# Configuration reference"
    assert "do not edit by hand" in md.splitlines()[2] and REGENERATE in md.splitlines()[2]
    assert "## `run`" in md and "## `tasks`" in md and "## `models`" in md
    assert "### `tasks.<task>`" in md  # the map's value table, under the map's description
    rows = _rows(md)
    assert rows["run"] == ["`run`", "object", "`{}`", "**required**", "run settings"]
    assert rows["run.steps"] == ["`run.steps`", "integer", "`5`", "≥ 1, ≤ 10", "optimizer steps"]
    assert rows["run.name"][1] == "string or null"
    # a map key, its value a $ref
    assert rows["tasks"][1] == "map of object (#/$defs/opt)"
    assert rows["tasks.<task>"][1] == "object (#/$defs/opt)"
    assert rows["tasks.<task>.lr"] == ["`tasks.<task>.lr`", "number", "", "> 0", "learning rate"]
    # an enum with a default
    assert rows["tasks.<task>.mode"] == ["`tasks.<task>.mode`", "string", '`"fast"`', 'one of `"fast"`, `"slow"`', "speed"]
    assert rows["models.<name>"] == ["`models.<name>`", "string", "", "length ≥ 1", ""]
    assert undocumented(SMALL) == ["run.name"]
