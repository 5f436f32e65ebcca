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
# The quickstart installs only when pyproject.toml changed: the dev install covers it.
touch ".venv/.quickstart-$(sha256sum pyproject.toml | cut -c1-16)"

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
# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
run_pytest() {
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "error: pytest collected no tests" >&2
        return 1
    fi
    return "$rc"
}

echo "== pytest (Python $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])'), newest dependencies, coverage)"
# Every run uses AISOC_TEST_WORKERS (default 3) pytest-xdist workers, as most tests wait on
# real daemons, sockets and subprocesses rather than the CPU.
WORKERS=${AISOC_TEST_WORKERS:-3}
run_pytest .venv/bin/python -m pytest -n "$WORKERS" --cov=aisoc_plugind \
    --cov-report=term:skip-covered --cov-fail-under=90 -p no:cacheprovider "$@"

# The same suite on every other CPython >= 3.11 on this machine, and once more with every
# runtime dependency at its declared floor (scripts/floors.py): a floor is a tested version.
# These runs leave out the tests marked `slow` (long end-to-end scenarios: hostile deploys
# through the watcher, the sdist's own suite, fuzzing, generated plugin projects; the main
# run above has them) to keep the whole command within CI's time.
# AISOC_TEST_MATRIX=0 skips both (a quick local run); CI always runs them.
if [ "${AISOC_TEST_MATRIX:-1}" = 0 ] && [ "${CI:-}" != true ]; then
    echo "== skipped: other interpreters and dependency floors (AISOC_TEST_MATRIX=0)"
    exit 0
fi
main_version=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
matrix_venv() {  # matrix_venv DIR PYTHON [pip args...]: a venv with the dev install
    local dir=$1 python=$2
    shift 2
    [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    "$dir/bin/python" -m pip install --quiet "$@" -e '.[dev]'
}
declare -A seen=(["$main_version"]=1)
for candidate in python3.11 python3.12 python3.13 python3.14 python3.15 \
    "$HOME"/.pyenv/versions/3.*/bin/python3; do
    python=$(command -v "$candidate" 2>/dev/null) || continue
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2] if sys.version_info >= (3, 11) and sys.implementation.name == "cpython" else "")' 2>/dev/null) || continue
    [ -n "$version" ] && [ -z "${seen[$version]:-}" ] || continue
    seen[$version]=1
    echo "== pytest (Python $version: $python)"
    matrix_venv ".venv-py$version" "$python"
    run_pytest ".venv-py$version/bin/python" -m pytest -q -n "$WORKERS" -m "not slow" \
        -p no:cacheprovider "$@"
done
echo "== pytest (Python $main_version, runtime dependencies at their floors)"
.venv/bin/python scripts/floors.py > .venv/floors.txt
matrix_venv .venv-floors "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" \
    -c .venv/floors.txt
.venv-floors/bin/python -m pip list --format=freeze | grep -i -F -f <(cut -d= -f1 .venv/floors.txt)
run_pytest .venv-floors/bin/python -m pytest -q -n "$WORKERS" -m "not slow" -p no:cacheprovider \
    "$@"
