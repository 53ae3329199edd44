#!/usr/bin/env bash
# Install what the test suite needs, then lint, type-check and run every test.
#
#   bash scripts/test.sh [pytest arguments...]
#
# Works on a fresh Debian bookworm machine as root (CI: installs the Debian packages) and as an
# ordinary user (Debian packages are then only checked; tests that need a missing one skip).
# Python: the active virtualenv if any; otherwise `python3` unless it is Debian's externally
# managed interpreter (PEP 668), in which case a virtualenv is made in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

# --- Debian packages ----------------------------------------------------------------------------
# package:what-shows-it-is-installed (a command, an absolute path, or "-" for the dpkg status).
DEB_PACKAGES=(
    "iipimage-server:/usr/lib/iipimage-server/iipsrv.fcgi"  # reference iipsrv 1.1 (differential tests)
    "nginx-light:nginx"                                      # tests/test_nginx.py
    "memcached:memcached"                                    # shared-cache tests
    "wrk:wrk"                                                # bench/http.py smoke test
    "libmemcached-dev:-"                                     # pylibmc
    "zlib1g-dev:-"
    "chromium:chromium"                                      # browser tests
    "python3-venv:-"                                         # ./.venv on Debian's Python
    "python3-pip:-"
)

deb_present() {  # deb_present PACKAGE PROBE
    local pkg=$1 probe=$2
    case $probe in
        /*) [[ -e $probe ]] && return 0 ;;
        -) ;;
        *) PATH="$PATH:/usr/sbin:/sbin" command -v "$probe" >/dev/null 2>&1 && return 0 ;;
    esac
    command -v dpkg-query >/dev/null 2>&1 &&
        [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == *"install ok installed"* ]]
}

apt_lists_fresh() {  # true if every package has a candidate version in the current lists
    local pkg policy
    for pkg in "$@"; do
        # (captured first: `grep -q` closing the pipe early would fail it under pipefail)
        policy=$(apt-cache policy "$pkg" 2>/dev/null || true)
        [[ $policy =~ Candidate:\ [^\(] ]] || return 1
    done
}

install_debian_packages() {
    local entry missing=()
    for entry in "${DEB_PACKAGES[@]}"; do
        deb_present "${entry%%:*}" "${entry#*:}" || missing+=("${entry%%:*}")
    done
    if ((${#missing[@]} == 0)); then
        log "Debian packages: all present"
        return
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "no apt-get; missing ${missing[*]} (tests that need them will skip)"
        return
    fi
    local sudo=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            log "not root: cannot install ${missing[*]} (tests that need them will skip)"
            return
        fi
    fi
    if ! apt_lists_fresh "${missing[@]}"; then
        log "apt-get update"
        "${sudo[@]}" apt-get update -q
    fi
    log "apt-get install ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# --- Python environment -------------------------------------------------------------------------
choose_python() {
    if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
        PY=$VIRTUAL_ENV/bin/python
        return
    fi
    local base=${PYTHON:-python3}
    local marker
    marker=$("$base" -c 'import sysconfig, os; print(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))')
    if [[ -e $marker ]] && ! "$base" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        if [[ ! -x .venv/bin/python ]]; then
            log "externally managed $base: making ./.venv"
            "$base" -m venv .venv
        fi
        PY=$PWD/.venv/bin/python
    else
        PY=$(command -v "$base")
    fi
}

install_debian_packages
choose_python
log "Python: $PY ($("$PY" --version 2>&1))"
log "pip install -e .[test]"
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
# Put the environment's scripts (ruff, mypy, iipserver) first on PATH for the steps below.
PATH="$(dirname "$PY"):$PATH"
export PATH

# --- Checks -------------------------------------------------------------------------------------
lint_paths=()
for dir in iipserver tests bench fuzz; do
    [[ -d $dir ]] && lint_paths+=("$dir")
done
log "ruff check ${lint_paths[*]}"
"$PY" -m ruff check "${lint_paths[@]}"
log "mypy iipserver"
"$PY" -m mypy iipserver
log "pytest"
"$PY" -m pytest -q "$@"
