"""The run config's methods (`METHODS`: each method's own parameters), and its reference: one source (`SCHEMA`'s
and `METHODS`' help texts), rendered by `config_reference`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evit.config.fields import Field
from evit.config.reference import REFERENCE_PATH, config_reference
from evit.config.schema import SCHEMA, SECTION_HELP, resolve_config
from evit.errors import ConfigError
from evit.methods import METHODS, describe_method, method_param_keys, method_params

ROOT = Path(__file__).resolve().parents[1]
FASHION = {"dataset": "fashion_mnist"}


def model_of(**model) -> dict:
    return resolve_config({"model": model, "data": FASHION})["model"]


def test_the_resolved_model_section_holds_its_methods_parameters_only():
    assert set(model_of()) == set(SCHEMA["model"]) and model_of()["method"] == "none"
    evit = model_of(method="evit", keep_rate=0.7)
    assert method_params(evit) == {"keep_rate": 0.7, "fuse_token": True, "drop_loc": [3, 6, 9]}
    assert set(evit) == set(SCHEMA["model"]) | {"keep_rate", "fuse_token", "drop_loc"}
    tome = model_of(method="tome", r=8)
    assert method_params(tome) == {"r": 8} and set(tome) == set(SCHEMA["model"]) | {"r"}
    assert method_params(model_of(method="tome")) == {"r": 0}


@pytest.mark.parametrize("model, message", [
    ({"method": "evit", "r": 8}, "model.r: a parameter of method tome, not of evit"),
    ({"method": "tome", "fuse_token": False}, "model.fuse_token: a parameter of method evit, not of tome"),
    ({"keep_rate": 0.7}, "model.keep_rate: a parameter of method evit, not of none"),
    ({"method": "tome", "r": -1}, "model.r: expected a value >= 0, got -1"),
    ({"method": "tome", "r": 1.5}, "model.r: expected an integer, got 1.5"),
    ({"method": "tome", "r": 2, "keep_rat": 0.7}, "model.keep_rat: unknown key"),
    ({"arch": "tome_deit_small_patch16_224", "method": "tome"},
     "model.arch: 'tome_deit_small_patch16_224' includes the method (ToMe); write `arch: deit_small_patch16_224` "
     "and `method: tome`"),
])
def test_a_parameter_of_another_method_or_a_bad_value_is_named(model, message):
    with pytest.raises(ConfigError) as e:
        model_of(**model)
    assert str(e.value).startswith(message)


def test_tome_refuses_gradient_checkpointing():
    with pytest.raises(ConfigError, match="train.grad_checkpointing: method tome does not support it"):
        resolve_config({"model": {"method": "tome"}, "data": FASHION, "train": {"grad_checkpointing": True}})


@pytest.mark.parametrize("model, params, message", [
    ({"method": "tome", "r": 4}, {"keep_rate": 0.5}, "eval.params.keep_rate: method tome overrides only r at"),
    ({"method": "evit"}, {"keep_rate": 1.5}, "eval.params.keep_rate: expected a value <= 1.0, got 1.5"),
    ({}, {"r": 2}, "eval.params.r: method none overrides nothing"),
])
def test_eval_params_are_the_methods_per_pass_parameter(model, params, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({"model": model, "data": FASHION, "eval": {"params": params}})
    cfg = resolve_config({"model": {"method": "tome"}, "data": FASHION, "eval": {"params": {"r": 3}}})
    assert cfg["eval"]["params"] == {"r": 3}


def test_the_canvas_is_the_demo_augments_and_holds_the_image():
    with pytest.raises(ConfigError, match="data.canvas: only the demo augment places images on a canvas, not 'de"):
        resolve_config({"data": {**FASHION, "canvas": 42}})
    with pytest.raises(ConfigError, match="data.canvas: 20 px is smaller than Fashion-MNIST's 28 px images"):
        resolve_config({"data": {**FASHION, "canvas": 20}, "train": {"augment": "demo"}})
    assert resolve_config({"data": {**FASHION, "canvas": 42}, "train": {"augment": "demo"}})["data"]["canvas"] == 42


def test_describe_labels_rows_by_method_and_parameters():
    assert [METHODS[m].label for m in METHODS] == ["baseline", "EViT", "ToMe", "DynamicViT"]
    assert describe_method("evit", method_params(model_of(method="evit", keep_rate=0.7))) == "keep 0.7, fused"
    assert describe_method("evit", {"keep_rate": 0.5, "fuse_token": False, "drop_loc": [3, 6, 9]}) == (
        "keep 0.5, not fused")
    # every parameter that differs from its default is shown: a drop-location ablation's rows differ
    assert describe_method("evit", {"keep_rate": 0.5, "fuse_token": True, "drop_loc": [2, 5]}) == (
        "keep 0.5, fused, drop_loc [2, 5]")
    assert describe_method("tome", {"r": 8}) == "r 8" and describe_method("none", {}) == ""
    assert describe_method("dynamicvit", {"base_rate": 0.7, "pruning_loc": [3, 6, 9]}) == "rate 0.7"
    assert [METHODS[m].variant_names() for m in METHODS] == [["baseline"], ["EViT fused", "EViT not fused"],
                                                                 ["ToMe"], ["DynamicViT"]]


def test_the_workflow_schema_leaves_methods_and_their_parameters_to_the_registry():
    fields = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())["$defs"]["experiment_fields"]
    assert fields["properties"]["method"] == {"type": "string", "description": fields["properties"]["method"]["description"]}
    assert not set(method_param_keys()) & set(fields["properties"]) and fields["additionalProperties"] is not False


def documented_fields() -> dict[str, dict[str, Field]]:
    """SCHEMA's sections, the model section with every method's parameters."""
    params = {k: f for m in METHODS.values() for k, f in m.params.items()}
    return {sec: {**fields, **params} if sec == "model" else fields for sec, fields in SCHEMA.items()}


def test_every_key_has_help():
    assert set(SECTION_HELP) == set(SCHEMA)
    for sec, text in SECTION_HELP.items():
        assert text.strip() and "\n" not in text, f"SECTION_HELP[{sec!r}] must be one non-empty line"
    for sec, fields in documented_fields().items():
        for key, f in fields.items():
            assert f.help.strip(), f"{sec}.{key}: its Field has no help text"


def test_reference_mentions_every_section_and_key():
    ref = config_reference()
    for sec, fields in documented_fields().items():
        assert f"## `{sec}`" in ref and SECTION_HELP[sec] in ref
        for key, f in fields.items():
            row = next((ln for ln in ref.splitlines() if ln.startswith(f"| `{sec}.{key}` |")), None)
            assert row is not None, f"{sec}.{key} is missing from the reference"
            assert f.help.replace("|", "\\|") in row


def test_reference_shows_recipe_defaults_and_bounds():
    ref = config_reference()
    row = next(ln for ln in ref.splitlines() if ln.startswith("| `train.epochs` |"))
    assert "scratch `300` / finetune `30` / demo `4` / none `100`" in row
    assert "`adamw` (every recipe)" in next(ln for ln in ref.splitlines() if ln.startswith("| `train.opt` |"))
    assert "| float in (0, 1] |" in next(ln for ln in ref.splitlines() if ln.startswith("| `model.keep_rate` |"))
    assert "| required |" in next(ln for ln in ref.splitlines() if ln.startswith("| `data.dataset` |"))


def test_committed_reference_is_current():
    path = ROOT / REFERENCE_PATH
    committed = path.read_text() if path.is_file() else ""
    assert committed == config_reference(), (
        f"{REFERENCE_PATH} is out of date with the schema and the methods; "
        f"run `evit config > {REFERENCE_PATH}`")


def test_evit_config_prints_the_reference_without_torch():
    code = ("import sys; from evit import cli; cli.main(['config']); "
            "assert 'torch' not in sys.modules, 'evit config imported torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == config_reference()


# ------------------------------------------------------------------------------------------ YAML syntax errors


def test_a_yaml_syntax_error_in_a_run_config_is_one_line_with_its_file_line_and_column(tmp_path):
    from evit.config.io import load_config

    bad = tmp_path / "run.yaml"
    bad.write_text("model:\n  arch: deit_tiny_patch16_224\ntrain: {epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == (f"{bad}, line 4, column 1: not valid YAML: while parsing a flow mapping; "
                            "expected ',' or '}', but got '<stream end>'")


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "train.lr=[1"],
     "evit train: error: --set 'train.lr=[1', column 3 of the value: not valid YAML: while parsing a flow sequence; "
     "expected ',' or ']', but got '<stream end>'"),
    (["eval", "--param", "keep_rate=a: b: c"],
     "evit eval: error: --param 'keep_rate=a: b: c', column 5 of the value: not valid YAML: mapping values are not "
     "allowed here"),
])
def test_a_malformed_set_or_param_value_is_one_line_naming_the_argument(tmp_path, argv, message):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": {"method": "evit"}, "data": FASHION}))
    (tmp_path / "weights.pth").write_bytes(b"")
    paths = {"train": ["--config", "run.yaml", "--run-dir", "run"], "eval": ["--checkpoint", "weights.pth"]}
    proc = subprocess.run([sys.executable, "-m", "evit.cli", *argv[:1], *paths[argv[0]], *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr) == (2, message + "\n")
    assert not (tmp_path / "run").exists()
