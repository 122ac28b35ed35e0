#!/usr/bin/env bash
# Install the system tools the ops, end-to-end and browser tests need, when missing:
#   promtool, prometheus            (Debian package "prometheus")
#   amtool, prometheus-alertmanager (Debian package "prometheus-alertmanager")
#   /usr/bin/chromium               (Debian package "chromium", driven by Playwright in tests/browser/)
# Idempotent: does nothing (and prints nothing) when all of them are there. Uses sudo only when not
# root. Debian/Ubuntu (apt-get) only; elsewhere it says what to install and fails.
set -euo pipefail

declare -A package_of=(
  [promtool]=prometheus
  [prometheus]=prometheus
  [amtool]=prometheus-alertmanager
  [prometheus-alertmanager]=prometheus-alertmanager
  # An absolute path: the browser tests launch exactly this binary (Playwright's executable_path).
  [/usr/bin/chromium]=chromium
)

missing_packages() {
  local cmd
  for cmd in "${!package_of[@]}"; do
    if [[ $cmd == /* ]]; then
      [ -x "$cmd" ] || echo "${package_of[$cmd]}"
    else
      command -v "$cmd" >/dev/null 2>&1 || echo "${package_of[$cmd]}"
    fi
  done | sort -u
}

die() { echo "install-system-deps: $*" >&2; exit 1; }

mapfile -t packages < <(missing_packages)
[ "${#packages[@]}" -eq 0 ] && exit 0

command -v apt-get >/dev/null 2>&1 \
  || die "need ${packages[*]} (promtool, amtool, prometheus, prometheus-alertmanager, chromium) and there is no apt-get; install them with your package manager"

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "not root and no sudo: run as root: apt-get install ${packages[*]}"
  sudo=(sudo)
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
apt() { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >>"$log" 2>&1; }

echo "install-system-deps: installing ${packages[*]}" >&2
if ! apt update -q || ! apt install -y -q --no-install-recommends "${packages[@]}"; then
  tail -n 40 "$log" >&2
  die "apt-get failed (see above)"
fi

mapfile -t still < <(missing_packages)
[ "${#still[@]}" -eq 0 ] || die "installed ${packages[*]} but still missing commands from: ${still[*]}"
