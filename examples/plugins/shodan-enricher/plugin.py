"""Example enricher: offline stand-in for a Shodan lookup."""

SAMPLE = {
    "1.1.1.1": {"ports": [53, 80, 443], "tags": ["dns", "cdn"], "org": "Cloudflare"},
    "8.8.8.8": {"ports": [53, 443], "tags": ["dns"], "org": "Google"},
}


class Plugin:
    def __init__(self, config):
        self.default_tags = list(config.get("default_tags", []))

    async def run(self, payload, context):
        ip = str(payload.get("ip", ""))
        hit = SAMPLE.get(ip)
        if hit is None:
            return {"ip": ip, "found": False, "tags": self.default_tags}
        return {"ip": ip, "found": True, **hit, "tags": hit["tags"] + self.default_tags}
