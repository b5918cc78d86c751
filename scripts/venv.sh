#!/usr/bin/env bash
# Creates (or reuses) a virtualenv at DIR and pip-installs into it, so nothing goes into the system Python:
# Debian 12 and Ubuntu 24.04 refuse `pip install` there ("externally-managed-environment", PEP 668).
#   bash scripts/venv.sh DIR PIP-INSTALL-ARGS...
#   bash scripts/venv.sh /opt/migpredictd .     # the daemon, where deploy/systemd/migpredictd.service runs it
#   bash scripts/venv.sh .venv -e '.[dev]'      # a developer's venv inside the clone, for the tests
# PYTHON picks the interpreter (default: python3 on PATH), e.g. PYTHON=/usr/bin/python3. When it lacks the
# venv/ensurepip modules (Debian/Ubuntu without python3-venv), python3-venv is installed with apt-get.
set -euo pipefail

log() { printf 'venv.sh: %s\n' "$*" >&2; }

if [[ $# -lt 2 ]]; then
    log "usage: bash scripts/venv.sh DIR PIP-INSTALL-ARGS...   (e.g. /opt/migpredictd .)"; exit 2
fi
dir=$1; shift
python=${PYTHON:-python3}
command -v "${python}" >/dev/null || { log "no ${python}: set PYTHON to a Python 3.11 or later"; exit 1; }
has_venv() { "${python}" -c 'import ensurepip, venv' 2>/dev/null; }

if "${dir}/bin/python" -m pip --version >/dev/null 2>&1; then
    log "reusing ${dir} ($("${dir}/bin/python" --version); remove it to start again)"
else
    if [[ -e "${dir}" && ! -f "${dir}/pyvenv.cfg" && -n "$(ls -A "${dir}")" ]]; then
        log "${dir} exists and is not a virtualenv: give a new or empty directory"; exit 1
    fi
    if ! has_venv; then
        missing="${python} has no venv/ensurepip module"
        if ! command -v apt-get >/dev/null; then
            log "${missing}: install your distribution's venv package, or set PYTHON to a Python with it"
            exit 1
        fi
        if [[ "$(id -u)" -ne 0 ]]; then
            log "${missing}: run this as root, or first: sudo apt-get install python3-venv"; exit 1
        fi
        log "${missing}: apt-get install python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y --no-install-recommends python3-venv
        # python3-venv serves the distribution's python3; another PYTHON needs its own package.
        has_venv || { log "${missing}, even with python3-venv: try PYTHON=/usr/bin/python3"; exit 1; }
    fi
    clear=()  # a venv without a working pip (a failed earlier run) is made again from scratch
    [[ -f "${dir}/pyvenv.cfg" ]] && clear=(--clear)
    log "creating ${dir} with $("${python}" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "${python}" -m venv "${clear[@]}" "${dir}"
fi
"${dir}/bin/python" -m pip install --quiet --upgrade pip
"${dir}/bin/python" -m pip install "$@"
log "done: ${dir}/bin/ holds python, pip and the commands just installed"
