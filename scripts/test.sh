#!/usr/bin/env bash
# Install everything the test suite needs, then run lint, types and the whole suite.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'

# System tools the tests use for real: OpenSSL (interop), systemd-analyze (unit checks),
# docker-registry (a real OCI registry on 127.0.0.1), rsyslog and logrotate (the shipped SIEM
# and rotation configs). Installed only when missing.
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v systemd-analyze >/dev/null || missing+=(systemd)
[ -x /usr/bin/docker-registry ] || missing+=(docker-registry)
[ -x /usr/sbin/rsyslogd ] || missing+=(rsyslog)
[ -x /usr/sbin/logrotate ] || missing+=(logrotate)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    else
        echo "warning: not installed (tests needing them are skipped): ${missing[*]}" >&2
    fi
fi

echo "== ruff"
.venv/bin/ruff check daemon tests bench
.venv/bin/ruff format --check daemon tests bench
echo "== import contracts"
.venv/bin/lint-imports --no-cache
echo "== mypy (strict)"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest --cov=aisoc_plugind --cov-report=term:skip-covered --cov-fail-under=90 -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
