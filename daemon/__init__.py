"""aisoc-plugind: the plugin lifecycle daemon of the AiSOC platform."""
