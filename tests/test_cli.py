"""The command line itself: version, help, python -m, --config, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from rlhfkit import __version__


def test_version_and_help(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"rlhfkit {__version__}"
    result = cli("-h")
    assert result.exit_code == 0 and "Usage" in result.stdout and "validate" in result.stdout


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "rlhfkit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_importing_rlhfkit_does_not_import_torch():
    code = "import sys, rlhfkit, rlhfkit.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def _demos(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"text": "hello"}\n{"prompt": 3, "response": "x"}\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    return path


def test_config_file_sets_defaults_and_command_line_wins(cli, tmp_path):
    data = _demos(tmp_path)
    assert cli("validate", data, "--kind", "demonstrations").exit_code == 1
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("skip-invalid: true\nkind: demonstrations\n")
    result = cli("validate", data, "--config", yaml_cfg)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"path": str(data), "kind": "demonstrations", "valid": 2, "skipped": 1}
    # the command line wins over the file
    result = cli("validate", data, "--config", yaml_cfg, "--no-skip-invalid")
    assert result.exit_code == 1 and ":2: field 'prompt'" in result.stderr
    # the global form, with a TOML table named after the command
    toml_cfg = tmp_path / "c.toml"
    toml_cfg.write_text('[validate]\nskip_invalid = true\nkind = "demonstrations"\n')
    result = cli("--config", toml_cfg, "validate", data)
    assert result.exit_code == 0 and json.loads(result.stdout)["skipped"] == 1


def test_config_file_errors_are_one_line(cli, tmp_path):
    data = _demos(tmp_path)
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("temprature: 0.7\n")
    result = cli("validate", data, "--kind", "prompts", "--config", bad_key)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {bad_key}: key 'temprature': not an option of 'rlhfkit validate'"
    result = cli("validate", data, "--kind", "prompts", "--config", tmp_path / "missing.yaml")
    assert result.exit_code == 1 and "no such config file" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("= = =\n")
    result = cli("validate", data, "--config", broken)
    assert result.exit_code == 1 and "not valid TOML" in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(cli, tmp_path):
    from rlhfkit.errors import DataError

    data = _demos(tmp_path)
    import pytest

    with pytest.raises(DataError):
        cli("--debug", "validate", data, "--kind", "demonstrations")
