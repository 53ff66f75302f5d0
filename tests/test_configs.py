"""configs/*.yaml: each is a valid `bentoml serve --arg-file` for the server, and names a model of its task.

Every config carries the model's architecture (config.json `architectures[0]`) in a comment,
`# architecture: NAME`: a top-level key that is not an argument would stop the server.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from settings.arguments import argument_names, engine_argument_names, parse_arguments
from settings.tasks import Task, infer_task

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
ARCHITECTURE_COMMENT = re.compile(r"^#\s*architecture:\s*(\S+)\s*$", re.MULTILINE)


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: the top level must be a mapping of argument names to values"
    return data


def _architecture(path: Path) -> str:
    found = ARCHITECTURE_COMMENT.findall(path.read_text())
    assert len(found) == 1, f"{path.name}: needs exactly one '# architecture: NAME' comment, found {found}"
    return found[0]


def test_one_config_per_task() -> None:
    tasks = {Task(_load(path)["task"]) for path in CONFIGS}
    assert tasks == set(Task), f"tasks without a config: {sorted(set(Task) - tasks)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_keys_are_arguments(path: Path) -> None:
    unknown = set(_load(path)) - argument_names() - engine_argument_names()
    assert not unknown, f"{path.name}: neither server nor vLLM engine arguments: {sorted(unknown)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_arguments_parse(path: Path) -> None:
    data = _load(path)
    args = parse_arguments(data, environ={})
    engine = {name: value for name, value in data.items() if name not in argument_names()}
    assert args.engine_args == engine, f"{path.name}: vLLM engine arguments must reach the engine as given"
    assert args.model_id, f"{path.name}: names no Hub model"
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", args.model_id), f"{path.name}: '{args.model_id}' is not a Hub id"
    assert args.model_name != "model", f"{path.name}: give the model a name of its own"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_task_fits_architecture(path: Path) -> None:
    data = _load(path)
    task = Task(data["task"])
    # A cross-encoder's architecture is a classifier's; rerank is read from its folder (or the task argument).
    by_architecture = Task.sequence_classification if task == Task.rerank else task
    assert infer_task([_architecture(path)]) == by_architecture
    assert path.stem.startswith(task.value), f"{path.name}: name the file after its task ({task.value})"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_generation_backend(path: Path) -> None:
    data = _load(path)
    if data.get("backend") == "vllm":
        assert Task(data["task"]).is_generative, f"{path.name}: vLLM serves generation here"
    if set(data) & (engine_argument_names() - argument_names()):  # server arguments (dtype, ...) go to both
        assert data.get("backend") == "vllm", f"{path.name}: vLLM engine arguments need backend: vllm"
