"""The `evit` command line: the command table, lazy imports, and the one error handler of every command."""
import subprocess
import sys

import pytest

from evit import cli


def test_help_lists_every_command_and_imports_none_of_their_modules():
    code = ("import sys; from evit import cli; text = cli.build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'timm', 'pandas', 'submitit', 'nvidia.dali') if m in sys.modules]; "
            "assert not heavy, heavy; print(text)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    words = " ".join(out.split())
    for name, (_, help_line) in cli.COMMANDS.items():
        assert f"{name} {help_line}" in words


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_command_is_defined_by_its_module_with_its_help_as_description(command):
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "subcommand")
    assert command in sub.choices
    assert sub.choices[command].description


def test_an_evit_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["launch", "--config", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evit launch: error: ") and "missing.yaml" in err and "\n" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert cli.main(["launch", "--config", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(f"evit launch: error: {bad}, line 2, column 1: not valid YAML")


def test_an_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert e.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err
