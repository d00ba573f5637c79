"""The workloads' one configuration helper (tasks/config.py): both workloads load through it and report every
config mistake as one line naming the key or the file."""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks import config
from tasks.omniglot.config import load_config as omniglot_config
from tasks.weight_decay.config import load_config as weight_decay_config


@dataclass
class Inner:
    steps: int = 10  # a documented default


@dataclass
class Schema:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"
    wandb: config.WandbConfig = field(default_factory=config.WandbConfig)


def test_defaults_files_then_overrides(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("inner: {steps: 3}\nname: from_file\n")
    cfg = config.load(Schema, [f], ["name=from_cli"])
    assert (cfg.inner.steps, cfg.name, cfg.wandb.mode) == (3, "from_cli", "offline")


@pytest.mark.parametrize("load", [lambda o: omniglot_config("demo", o), lambda o: weight_decay_config([], o)],
                         ids=["omniglot", "weight_decay"])
@pytest.mark.parametrize("override, message", [
    ("wandb.mode=cloud", "wandb.mode"), ("nosuch.key=1", "nosuch"), ("wandb", "key=value")])
def test_both_workloads_give_one_line_errors(load, override, message):
    with pytest.raises(config.ConfigError, match=message) as err:
        load([override])
    assert "\n" not in str(err.value) and str(err.value).startswith("invalid config")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("meta:\n  steps: [1, 2\n")
    with pytest.raises(config.ConfigError, match=r"YAML syntax error in .*broken.yaml at line 3"):
        omniglot_config(str(bad), [])


def test_check_writable(tmp_path):
    assert config.check_writable(tmp_path / "new" / "dir", "out_dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(config.ConfigError, match=r"out_dir='.*file/sub' is not writable"):
        config.check_writable(tmp_path / "file" / "sub", "out_dir")


def test_parse_cli_splits_flags_config_and_overrides():
    from tasks.config import parse_cli

    options = {"--resume": "run.resume=true", "--eval-only": None}
    assert parse_cli(["--config", "x", "--resume", "a.b=1"], "d", options) == ("x", ["run.resume=true", "a.b=1"], set())
    assert parse_cli(["--eval-only", "config=y"], "d", options) == ("y", [], {"--eval-only"})
    assert parse_cli(["-h"], "d", options) is None
    with pytest.raises(SystemExit, match="unknown option '--bogus'; use --config NAME, --resume, --eval-only"):
        parse_cli(["--bogus"], "d", options)
    with pytest.raises(SystemExit, match="--config needs a name, e.g. --config d"):
        parse_cli(["--config"], "d", options)


@dataclass
class Flat:
    steps: int = 3  # a flat schema, as the single-file examples have


def test_from_argv_gives_the_dataclass_help_and_one_line_errors(capsys):
    assert config.from_argv(Flat, ["steps=5"]) == Flat(steps=5)
    with pytest.raises(SystemExit) as exit_:
        config.from_argv(Flat, ["--help"], "An example.")
    assert exit_.value.code == 0
    assert capsys.readouterr().out == "An example.\n\noptions (key=value, defaults shown):\n  steps=3\n"
    for argv, message in ((["stepz=5"], r"Key 'stepz' not in 'Flat'.*Options: steps \(--help"),
                          (["steps=many"], "could not be converted to Integer"), (["steps"], "must be key=value")):
        with pytest.raises(SystemExit, match=message) as exit_:
            config.from_argv(Flat, argv)
        assert "\n" not in str(exit_.value.code)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.py") if "from_argv" in p.read_text()))
def test_every_example_names_a_misspelt_option_in_one_line(example):
    done = subprocess.run([sys.executable, str(EXAMPLES / example), "no_such_option=1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Key 'no_such_option' not in 'Config'" in done.stderr
