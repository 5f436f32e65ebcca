"""aisoc-plugind: the plugin lifecycle daemon of the AiSOC platform."""

__all__ = ["__version__"]

# The one version source: pyproject.toml reads it (tool.setuptools.dynamic).
__version__ = "0.1.0"
