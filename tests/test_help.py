"""python -m fastreg.train --help: hydra's help template in configs/config.yaml, checked against what it describes.

Every group it describes is a config group, every key it names is a setting of the typed config (fastreg/config.py),
every value it shows is the one the same overrides compose, and every example composes into a valid config; the
recipe and CPU examples are the README's commands, character for character.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_readme_commands import README, shell_blocks

import fastreg.configs
from fastreg.config import TrainConfig, _section_schema, to_config

CONFIGS = Path(fastreg.configs.__file__).parent
KEY_LINE = re.compile(r"^  ([a-z_]+(?:\.[a-z_]+)*) {2,}(.*?)(?:  \[(.*)\])?$")  # "  data.crop_size   what  [40]"
GROUP_LINE = re.compile(r"^  ([a-z]+) {2,}\S")


def help_text(*overrides: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fastreg.train", *overrides, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def section(text: str, title: str) -> list[str]:
    """The lines under `== <title>...==` up to the next section."""
    body = text.split(f"== {title}", 1)[1].split("\n", 1)[1]
    return body.split("\n== ", 1)[0].splitlines()


def is_setting(key: str) -> bool:
    """Whether the dotted key is a field of TrainConfig's dataclasses (teacher.checkpoint: TeacherConfig's)."""
    schema: typing.Any = TrainConfig
    *sections, last = key.split(".")
    for part in sections:
        hints = typing.get_type_hints(schema)
        if part not in hints or _section_schema(hints[part]) is None:
            return False
        schema = _section_schema(hints[part])
    return last in {f.name for f in dataclasses.fields(schema)}


def examples(text: str) -> list[str]:
    """The commands under == Examples ==, continuation lines joined (as test_readme_commands reads the README)."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(section(text, "Examples")))
    return [line.strip() for line in joined.splitlines() if line.startswith("python -m fastreg.train")]


def composed(overrides: list[str]):
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        return compose("config", overrides=["trainer.out_dir=/tmp/x", *overrides])


@pytest.mark.parametrize("overrides", [[], ["experiment=none"]])
def test_help_names_real_groups_and_keys_and_shows_this_commands_values(overrides):
    text = help_text(*overrides)
    lines = text.splitlines()
    assert len(lines) <= 60  # hydra's stock page printed the whole config: 118 lines
    groups = [m.group(1) for line in section(text, "Groups") if (m := GROUP_LINE.match(line))]
    assert sorted(groups) == sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "__pycache__")
    keys = [KEY_LINE.match(line) for line in section(text, "Keys") if line.strip()]
    assert all(keys), [line for line, m in zip(section(text, "Keys"), keys) if not m]
    assert len(keys) >= 10 and "data.root" in [m.group(1) for m in keys]
    for m in keys:
        assert is_setting(m.group(1)), f"--help names {m.group(1)}, which is not a setting of fastreg/config.py"
    shown = {m.group(1): m.group(3) for m in keys if m.group(3) is not None}
    assert len(shown) >= 8
    cfg = composed(overrides)
    assert shown == {key: str(OmegaConf.select(cfg, key)) for key in shown}
    assert shown["name"] == ("custom" if overrides else "demo")  # experiment=none without data.root


def test_help_examples_compose_and_are_the_readmes_commands():
    found = examples(help_text())
    assert len(found) == 3
    for command in found:
        to_config(composed(command.split()[3:]))  # validated: every key known, every value allowed
    readme = [c for block in shell_blocks(README.read_text()) for c in block]
    assert found[0] == "python -m fastreg.train"  # the demo
    for command in found[1:]:  # the recipe (Quick start) and your own folder on a CPU
        assert command in readme, f"--help's example is not a README command: {command}"
