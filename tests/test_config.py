"""The run-config reference: one source (`SCHEMA`'s help texts), rendered by `config_reference`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import evit.config as C

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_has_help():
    assert set(C.SECTION_HELP) == set(C.SCHEMA)
    for sec, text in C.SECTION_HELP.items():
        assert text.strip() and "\n" not in text, f"SECTION_HELP[{sec!r}] must be one non-empty line"
    for sec, fields in C.SCHEMA.items():
        for key, f in fields.items():
            assert f.help.strip(), f"{sec}.{key}: its Field has no help text"


def test_reference_mentions_every_section_and_key():
    ref = C.config_reference()
    for sec, fields in C.SCHEMA.items():
        assert f"## `{sec}`" in ref and C.SECTION_HELP[sec] in ref
        for key, f in fields.items():
            row = next((ln for ln in ref.splitlines() if ln.startswith(f"| `{sec}.{key}` |")), None)
            assert row is not None, f"{sec}.{key} is missing from the reference"
            assert f.help.replace("|", "\\|") in row


def test_reference_shows_recipe_defaults_and_bounds():
    ref = C.config_reference()
    row = next(ln for ln in ref.splitlines() if ln.startswith("| `train.epochs` |"))
    assert "scratch `300` / finetune `30` / demo `4` / none `100`" in row
    assert "`adamw` (every recipe)" in next(ln for ln in ref.splitlines() if ln.startswith("| `train.opt` |"))
    assert "| float in (0, 1] |" in next(ln for ln in ref.splitlines() if ln.startswith("| `model.keep_rate` |"))
    assert "| required |" in next(ln for ln in ref.splitlines() if ln.startswith("| `data.dataset` |"))


def test_committed_reference_is_current():
    path = ROOT / C.REFERENCE_PATH
    committed = path.read_text() if path.is_file() else ""
    assert committed == C.config_reference(), (
        f"{C.REFERENCE_PATH} is out of date with SCHEMA in evit/config.py; "
        f"run `python -m evit.config > {C.REFERENCE_PATH}`")


def test_main_prints_reference_without_torch():
    code = ("import runpy, sys; runpy.run_module('evit.config', run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'evit.config imported torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == C.config_reference()
