"""aisoc-plugind: the plugin lifecycle daemon of the AiSOC platform."""
__version__ = "0.1.0"
