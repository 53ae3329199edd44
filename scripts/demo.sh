#!/usr/bin/env bash
# Install iipserver and serve the demo: a generated image set, the viewer and the VisiOmatic
# client on http://127.0.0.1:8080/ (in-process caches only; no nginx, no memcached).
#
#   bash scripts/demo.sh [iipserver serve options...]     e.g. --port 9000, or a DATA_DIR
#
# Uses the active virtualenv, or python3 unless it is Debian's externally managed interpreter
# (PEP 668), in which case a virtualenv is made in ./.venv (Debian package python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    PY=$VIRTUAL_ENV/bin/python
else
    base=${PYTHON:-python3}
    marker=$("$base" -c 'import sysconfig, os; print(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))')
    if [[ -e $marker ]] && ! "$base" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        if [[ ! -x .venv/bin/python ]]; then
            if ! "$base" -m venv .venv 2>/dev/null && ((EUID == 0)); then
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
                "$base" -m venv .venv
            fi
        fi
        PY=$PWD/.venv/bin/python
    else
        PY=$(command -v "$base")
    fi
fi
"$PY" -m pip install -q --disable-pip-version-check -e '.[fits]'
exec "$PY" -m iipserver serve "$@"
