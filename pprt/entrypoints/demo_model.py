"""The bundled demo model: a tiny Qwen3-architecture completion model shipped in pprt/demo/.

`demo_model_path()` is where it lies in the installed package (or the source
tree); `python -m pprt.generate` uses it when no --model is given.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_DIR = "demo"


def demo_model_path() -> Path:
    """Directory of the bundled demo model (it may be absent in a checkout that has not trained it)."""
    try:
        return Path(str(resources.files("pprt") / DEMO_DIR))
    except (ModuleNotFoundError, TypeError):  # an unusual loader: fall back to the package's folder
        return Path(__file__).resolve().parent.parent / DEMO_DIR


def demo_model_available() -> bool:
    """True when the demo directory holds at least a config.json and weights."""
    path = demo_model_path()
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
