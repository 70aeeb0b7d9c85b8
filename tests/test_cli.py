"""The command line itself: version, help, python -m, --config, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import write_jsonl
from rlhfkit import __version__


def test_version_and_help(cli):
    import torch
    import transformers

    from rlhfkit.models import resolve_device

    result = cli("--version")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"rlhfkit {__version__}", f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    assert lines[3].split()[:2] == ["device", str(resolve_device("auto"))] and len(lines) == 4  # a GPU adds its name
    result = cli("-h")
    assert result.exit_code == 0 and "Usage" in result.stdout and "--install-completion" in result.stdout
    # the commands in the recipe's order, then the tools
    listed = [
        line.split()[1]
        for line in result.stdout.splitlines()
        if line.startswith("│ ") and len(line.split()) > 2 and line.split()[1].islower()
    ]
    recipe = ["sft", "collect", "label", "rank-import", "train-rm", "ppo", "eval"]
    assert [c for c in listed if c in recipe + ["validate", "plot"]] == recipe + ["validate", "plot"]


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
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    return write_jsonl(path, [{"text": "hello"}, {"prompt": 3, "response": "x"}, {"messages": messages}])


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


STAGE_CONFIGS = {  # command -> (its module in rlhfkit.cli, its config class)
    "sft": ("sft", "SFTConfig"),
    "collect": ("collect", "CollectConfig"),
    "rank-import": ("rank_import", "RankImportConfig"),
    "train-rm": ("train_rm", "TrainRMConfig"),
    "ppo": ("ppo", "PPOConfig"),
    "eval": ("eval", "EvalConfig"),
}


def _commands():
    """(command name, {parameter: (annotation, OptionInfo, default)}, config class) from each command's signature."""
    import importlib
    import inspect
    import typing

    from rlhfkit import config

    out = []
    for name, (module, cls) in STAGE_CONFIGS.items():
        fn = inspect.unwrap(importlib.import_module(f"rlhfkit.cli.{module}").command)
        hints = typing.get_type_hints(fn, include_extras=True)
        params = {}
        for param in inspect.signature(fn).parameters.values():
            base, info = typing.get_args(hints[param.name])[:2]
            params[param.name] = (base, info, param.default)
        out.append((name, params, getattr(config, cls)))
    return out


def test_every_config_field_is_an_option_with_the_configs_default():
    """The config dataclass is the one home of defaults: every field has its option (and nothing
    else has one besides --config), each defaulting to the field's value."""
    import dataclasses

    for name, params, cls in _commands():
        params.pop("config")
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(params) == fields, (
            f"rlhfkit {name}: options without a field {set(params) - fields}, fields without an option {fields - set(params)}"
        )
        defaults = cls()
        for field, (_, _, default) in params.items():
            assert default == getattr(defaults, field), f"rlhfkit {name} --{field}: {default!r} != {getattr(defaults, field)!r}"


def test_choices_come_from_the_configs_literal_types():
    import enum
    import typing

    from rlhfkit import config

    for name, params, cls in _commands():
        hints = typing.get_type_hints(cls, vars(config))
        for field, (base, _, _) in params.items():
            literal = hints.get(field)
            if typing.get_origin(literal) is typing.Literal:
                assert isinstance(base, type) and issubclass(base, enum.Enum), f"rlhfkit {name} --{field}"
                assert tuple(e.value for e in base) == config.choices(literal), f"rlhfkit {name} --{field}"


def test_one_help_panel_layout():
    """Every option sits in a panel; the shared panels come last, in the same order, in every command."""
    from rlhfkit.cli.common import GENERAL, LORA_PANEL, RUN_PANEL, SCALE_PANEL

    shared = [RUN_PANEL, LORA_PANEL, SCALE_PANEL, GENERAL]
    for name, params, _ in _commands():
        panels = list(
            dict.fromkeys(getattr(info, "rich_help_panel", None) for field, (_, info, _) in params.items() if field != "rankings")
        )
        assert None not in panels, f"rlhfkit {name}: an option outside every panel"
        tail = [p for p in panels if p in shared]
        assert tail == [p for p in shared if p in panels] and panels[-len(tail) :] == tail, f"rlhfkit {name}: {panels}"
