"""Baking a model into a Bento: store its folder in BentoML's model store, then build with its tag.

    .venv/bin/python -m settings.model_store --model_dir /models/sst --name distilbert-sst2
    .venv/bin/python -m settings.model_store --model_id org/name [--revision REV] --name my-model
    .venv/bin/bentoml build --arg bento_model=distilbert-sst2:latest

The service declares `bentoml.models.BentoModel(bento_model)`, so `bentoml build` packs the model
into the Bento and the image serves it with no Hub access. (BentoML's HuggingFaceModel does the same
from a Hub id but asks the Hub for the commit at build time; this path also works offline, from a
folder or the local Hub cache.)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import bentoml

from settings.arguments import parse_arguments
from settings.loading import resolve_model_path


def store_model(folder: Path, name: str) -> str:
    """Copy a model folder into BentoML's model store; returns the new tag."""
    with bentoml.models.create(name, labels={"source": "hf-bentoml-server"}) as model:
        shutil.copytree(folder, model.path, dirs_exist_ok=True, symlinks=False)
    return str(model.tag)


def stored_model_path(tag: str) -> Path:
    """The folder of a stored model: in the local store at build time, inside the Bento when serving it."""
    return Path(bentoml.models.get(tag).path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Store a model folder in BentoML's model store.")
    parser.add_argument("--model_dir", help="a local model folder")
    parser.add_argument("--model_id", help="a Hub id, read through huggingface_hub (its cache when offline)")
    parser.add_argument("--revision", help="Hub revision of model_id")
    parser.add_argument("--name", required=True, help="name of the stored model (BentoML tag name)")
    options = parser.parse_args()
    given = {"model_dir": options.model_dir, "model_id": options.model_id, "model_revision": options.revision}
    args = parse_arguments({k: v for k, v in given.items() if v}, environ={})
    print(store_model(resolve_model_path(args), options.name))


if __name__ == "__main__":
    main()
