"""The playground page and the API docs page: plain HTML, CSS and JS served from this folder, no build step."""

from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent
