"""Map Wazuh alert fields onto the normalised event."""

SEVERITY = [(12, "critical"), (8, "high"), (4, "medium"), (0, "low")]


def normalise(alert):
    rule = alert.get("rule", {})
    level = int(rule.get("level", 0))
    severity = next(name for floor, name in SEVERITY if level >= floor)
    return {
        "source": "wazuh",
        "rule_id": str(rule.get("id", "")),
        "title": rule.get("description", ""),
        "severity": severity,
        "host": alert.get("agent", {}).get("name"),
    }
