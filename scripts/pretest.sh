#!/usr/bin/env bash
# Installs the Debian packages the integration tests need, only when missing.
# Run by `npm test` (the "pretest" script) on a fresh Debian machine, as root or
# through sudo. Quick (no apt call at all) when everything is already present.
#
# To add a tool: add one "command-path package" line to NEEDED below, and, if the
# package needs debconf answers, a line to preseed() below.
set -euo pipefail

# "absolute path of a command the tests need" -> "Debian package that provides it"
NEEDED=(
  "/usr/sbin/postfix postfix"
  "/usr/sbin/postconf postfix"
  "/usr/sbin/smtp-sink postfix"
  "/usr/sbin/smtp-source postfix"
  "/usr/lib/postfix/sbin/smtpd postfix"
  "/usr/lib/postfix/sbin/virtual postfix"
  "/usr/lib/python3/dist-packages/dkim python3-dkim"
  "/usr/lib/python3/dist-packages/nacl python3-nacl"
  "/usr/sbin/opendkim-testmsg opendkim-tools"
  "/usr/bin/openssl openssl"
  "/usr/bin/swaks swaks"
  "perl:Net::SSLeay libnet-ssleay-perl"
)

# A path must exist (and be executable, for a command); "perl:Module" must load in perl.
present() {
  case "$1" in
    perl:*) perl -M"${1#perl:}" -e 1 >/dev/null 2>&1 ;;
    *) [[ -x "$1" ]] ;;
  esac
}

missing=()
for entry in "${NEEDED[@]}"; do
  read -r cmd pkg <<<"$entry"
  if ! present "$cmd"; then
    case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

# --- something is missing: we need root -------------------------------------
if [[ $EUID -eq 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "pretest: missing Debian packages: ${missing[*]}" >&2
  echo "pretest: not root and no password-less sudo; run this once, then npm test again:" >&2
  echo "  sudo bash $(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")" >&2
  exit 1
fi
as_root() { "${SUDO[@]}" "$@"; }

echo "pretest: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive

preseed() {
  local pkg
  for pkg in "$@"; do
    case "$pkg" in
      postfix)
        echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
        echo "postfix postfix/mailname string localhost" | as_root debconf-set-selections
        ;;
    esac
  done
}
preseed "${missing[@]}"

# Keep package install scripts from starting system daemons (postfix, ...).
POLICY=/usr/sbin/policy-rc.d
made_policy=0
cleanup() {
  if [[ $made_policy -eq 1 ]]; then as_root rm -f "$POLICY"; fi
}
trap cleanup EXIT
if [[ ! -e "$POLICY" ]]; then
  printf '#!/bin/sh\nexit 101\n' | as_root tee "$POLICY" >/dev/null
  as_root chmod 755 "$POLICY"
  made_policy=1
fi

log=$(mktemp /tmp/pretest-apt.XXXXXX.log)
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >>"$log" 2>&1
}
if ! apt_install "${missing[@]}"; then
  # Package lists missing or stale on a fresh machine: update once and retry.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 || true
  if ! apt_install "${missing[@]}"; then
    echo "pretest: apt-get install ${missing[*]} failed; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
fi

# The tests run private Postfix instances only; no system postfix must be left running
# (e.g. when policy-rc.d was already there and allowed the start).
if [[ " ${missing[*]} " == *" postfix "* ]]; then
  if as_root /usr/sbin/postfix status >/dev/null 2>&1; then
    as_root /usr/sbin/postfix stop >>"$log" 2>&1 || true
  fi
  # Keep it from starting at boot on machines that boot with systemd.
  if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    as_root systemctl disable --now postfix >>"$log" 2>&1 || true
  fi
fi

# Check that every needed command is there now.
for entry in "${NEEDED[@]}"; do
  read -r cmd pkg <<<"$entry"
  if ! present "$cmd"; then
    echo "pretest: $cmd still missing after installing $pkg (log: $log)" >&2
    exit 1
  fi
done
rm -f "$log"
