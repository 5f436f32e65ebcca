"""Example connector: normalise a Wazuh alert."""

from .wazuh.normalise import normalise


class Plugin:
    def run(self, payload, context):
        return normalise(payload.get("alert", {}))
