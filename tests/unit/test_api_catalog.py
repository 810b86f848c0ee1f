"""The model catalog: config.pbtxt parsing and the models of model_repo/."""

from pathlib import Path

import pytest

from aiflow.api.catalog import ACCEPTS, EMITS, PbtxtError, load_catalog, model_info, parse_pbtxt
from aiflow.api.locations import CHECKOUT_ROOT

# The data-plane contract of the brief: model -> (accepts, emits).
CONTRACT = {
    "captioner": ("image", "caption"),
    "vision_head": ("image", "features"),
    "vision_tail": ("features", "features"),
    "caption_decoder": ("features", "caption"),
    "caption_drafter": ("features", "drafts"),
    "caption_verifier": ("drafts", "caption"),
}


def write_model_repo(root: Path, contract: dict[str, tuple[str, str]] = CONTRACT) -> Path:
    """A model repository whose models declare the given contract (no model code: only configs)."""
    for name, (accepts, emits) in contract.items():
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\n'
            f'parameters: {{ key: "{ACCEPTS}" value: {{ string_value: "{accepts}" }} }}\n'
            f'parameters {{\n  key: "{EMITS}"\n  value {{ string_value: "{emits}" }}\n}}\n'
        )
    return root


def test_parser_reads_fields_messages_lists_and_comments():
    text = '''
    # a comment
    name: "vision_head"  # trailing comment
    max_batch_size: 8
    input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ -1, 3 ] } ]
    instance_group [{ kind: KIND_CPU, count: 2 }]
    parameters: { key: "a" value: { string_value: "say \\"hi\\"" } }
    parameters < key: 'b' value < string_value: "x" "y" > >
    '''
    config = parse_pbtxt(text)
    assert config["name"] == ["vision_head"]
    assert config["max_batch_size"] == ["8"]
    assert config["input"][0]["dims"] == ["-1", "3"]
    assert config["instance_group"][0] == {"kind": ["KIND_CPU"], "count": ["2"]}
    assert config["parameters"][0]["value"][0]["string_value"] == ['say "hi"']
    assert config["parameters"][1]["value"][0]["string_value"] == ["xy"]


@pytest.mark.parametrize("text", ['name: "x" {', "input [ { name: 1 }", "}", '"dangling"'])
def test_parser_rejects_broken_text(text):
    with pytest.raises(PbtxtError):
        parse_pbtxt(text)


def test_model_info_takes_parameters_and_defaults_name_to_directory(tmp_path):
    (tmp_path / "mymodel").mkdir()
    config = tmp_path / "mymodel" / "config.pbtxt"
    config.write_text('backend: "python"\nparameters: { key: "aiflow.accepts" value: { string_value: "image" } }\n'
                      'parameters: { key: "other" value: { string_value: "" } }\n')
    info = model_info(config)
    assert info.name == "mymodel"
    assert info.accepts == "image" and info.emits is None
    assert info.parameters["other"] == ""


def test_load_catalog_lists_model_directories_and_tolerates_a_missing_repo(tmp_path):
    write_model_repo(tmp_path / "repo")
    (tmp_path / "repo" / "not_a_model").mkdir()
    catalog = load_catalog(tmp_path / "repo")
    assert sorted(catalog) == sorted(CONTRACT)
    assert load_catalog(tmp_path / "nowhere") == {}


def test_catalog_location_is_configurable(tmp_path, monkeypatch):
    write_model_repo(tmp_path, {"only": ("image", "caption")})
    monkeypatch.setenv("AIFLOW_MODEL_REPO", str(tmp_path))
    assert list(load_catalog()) == ["only"]


def test_the_repository_model_repo_declares_the_contract(monkeypatch):
    monkeypatch.delenv("AIFLOW_MODEL_REPO", raising=False)
    catalog = load_catalog()
    assert catalog, f"no models found in {CHECKOUT_ROOT / 'model_repo'}"
    for name, (accepts, emits) in CONTRACT.items():
        assert name in catalog, f"model_repo/ lacks {name}"
        assert (catalog[name].accepts, catalog[name].emits) == (accepts, emits), name
