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
  # Postfix's AUTH in tests/engine/auth.test.ts (Cyrus SASL with a private sasldb): saslpasswd2,
  # and the PLAIN and LOGIN plug-ins (libsasl2-modules is only recommended by libsasl2-2).
  "/usr/sbin/saslpasswd2 sasl2-bin"
  "/usr/lib/*/sasl2/libplain.so.2 libsasl2-modules"
  "/usr/lib/*/sasl2/liblogin.so.2 libsasl2-modules"
  "/usr/bin/swaks swaks"
  # aiosmtpd for tests/interop/matrix.test.ts (run by /usr/bin/python3: Debian's modules).
  "/usr/lib/python3/dist-packages/aiosmtpd python3-aiosmtpd"
  "perl:Net::SSLeay libnet-ssleay-perl"
  # Postfix's log summarizer, run on a real flush's log by tests/interop/pflogsumm.test.ts.
  "/usr/sbin/pflogsumm pflogsumm"
)

# A path must exist (and be executable, for a command; a shared library *.so* need only
# exist; a path may be a glob, for multiarch library dirs); "perl:Module" must load in perl.
present() {
  local p
  case "$1" in
    perl:*) perl -M"${1#perl:}" -e 1 >/dev/null 2>&1 ;;
    *)
      # shellcheck disable=SC2086  # let a glob expand
      for p in $1; do
        if [[ -x "$p" ]] || { [[ "$p" == *.so* ]] && [[ -e "$p" ]]; }; then return 0; fi
      done
      return 1 ;;
  esac
}

# --- Exim and OpenSMTPD, unpacked beside Postfix (tests/interop/matrix.test.ts) ---------------
# exim4-daemon-light and opensmtpd cannot be installed with apt next to postfix (all three
# provide mail-transport-agent). Their .debs are fetched with `apt-get download` into
# $DEB_CACHE and unpacked with `dpkg-deb -x` into $UNPACK_ROOT/<package>/ (no maintainer script
# runs); the libraries they link and what their postinst would create are added here by hand:
# the Debian-exim user (compiled into exim), the opensmtpd/opensmtpq users, the chroot dir
# /var/lib/opensmtpd/empty and /usr/libexec/opensmtpd (the helpers' compiled-in path, a symlink
# into the unpacked tree). Only what is missing is done; nothing at all when all is there.
UNPACK_ROOT=/opt/mudmail-test
DEB_CACHE=/var/cache/mudmail-test
# "file that must exist in the unpacked tree" -> "package to unpack"
UNPACKED=(
  "$UNPACK_ROOT/exim4-daemon-light/usr/sbin/exim4 exim4-daemon-light"
  "$UNPACK_ROOT/opensmtpd/usr/sbin/smtpd opensmtpd"
  "$UNPACK_ROOT/opensmtpd/usr/libexec/opensmtpd/mail.maildir opensmtpd"
)
unpacked_ready() {
  local entry file pkg
  for entry in "${UNPACKED[@]}"; do
    read -r file pkg <<<"$entry"
    [[ -x "$file" ]] || return 1
  done
  getent passwd Debian-exim >/dev/null && getent passwd opensmtpd >/dev/null \
    && getent passwd opensmtpq >/dev/null && [[ -d /var/lib/opensmtpd/empty ]] \
    && [[ -x /usr/libexec/opensmtpd/mail.maildir ]] && [[ -f "$UNPACK_ROOT/.libs-ok" ]]
}
if ! unpacked_ready; then
  if [[ $EUID -eq 0 ]]; then
    AS_ROOT=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    AS_ROOT=(sudo -n)
  else
    echo "pretest: Exim/OpenSMTPD for the interop tests are not unpacked yet, and this needs root:" >&2
    echo "  sudo bash $(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")" >&2
    exit 1
  fi
  unpack_log=$(mktemp /tmp/pretest-unpack.XXXXXX.log)
  unpack_fail() {
    echo "pretest: $1; last lines of $unpack_log:" >&2
    tail -n 30 "$unpack_log" >&2
    exit 1
  }
  echo "pretest: unpacking exim4-daemon-light and opensmtpd into $UNPACK_ROOT (apt-get download + dpkg-deb -x)"
  "${AS_ROOT[@]}" mkdir -p "$DEB_CACHE" "$UNPACK_ROOT"
  newest_deb() { find "$DEB_CACHE" -maxdepth 1 -name "$1_*.deb" | sort -V | tail -n 1; }
  fetch_deb() {
    local deb
    deb=$(newest_deb "$1")
    if [[ -z "$deb" ]]; then
      # Download as root into a root-owned dir (apt's _apt sandbox user could not write there).
      (cd "$DEB_CACHE" && "${AS_ROOT[@]}" apt-get download -q -o APT::Sandbox::User=root "$1") >>"$unpack_log" 2>&1 \
        || { "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$unpack_log" 2>&1 || true
             (cd "$DEB_CACHE" && "${AS_ROOT[@]}" apt-get download -q -o APT::Sandbox::User=root "$1") >>"$unpack_log" 2>&1; } \
        || unpack_fail "apt-get download $1 failed"
      deb=$(newest_deb "$1")
    fi
    echo "$deb"
  }
  libs=()
  for pkg in exim4-daemon-light opensmtpd; do
    deb=$(fetch_deb "$pkg")
    if [[ ! -e "$UNPACK_ROOT/$pkg/.unpacked" ]]; then
      "${AS_ROOT[@]}" rm -rf "$UNPACK_ROOT/$pkg"
      "${AS_ROOT[@]}" dpkg-deb -x "$deb" "$UNPACK_ROOT/$pkg" >>"$unpack_log" 2>&1 || unpack_fail "dpkg-deb -x $deb failed"
      "${AS_ROOT[@]}" touch "$UNPACK_ROOT/$pkg/.unpacked"
    fi
    # The shared libraries it depends on (lib*, first alternative) that are not installed yet.
    for dep in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -e 's/|.*//' -e 's/([^)]*)//g' -e 's/ //g' | grep '^lib' || true); do
      dpkg-query -W -f '${Status}' "$dep" 2>/dev/null | grep -q 'install ok installed' || libs+=("$dep")
    done
  done
  if [[ ${#libs[@]} -gt 0 ]]; then
    echo "pretest: installing libraries for them: ${libs[*]}"
    lib_install() {
      "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${libs[@]}" >>"$unpack_log" 2>&1
    }
    lib_install || { "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$unpack_log" 2>&1 || true; lib_install; } \
      || unpack_fail "apt-get install ${libs[*]} failed"
  fi
  for bin in "$UNPACK_ROOT/exim4-daemon-light/usr/sbin/exim4" "$UNPACK_ROOT/opensmtpd/usr/sbin/smtpd"; do
    if ldd "$bin" 2>&1 | grep -q 'not found'; then
      ldd "$bin" >>"$unpack_log" 2>&1 || true
      unpack_fail "$bin still misses shared libraries"
    fi
  done
  "${AS_ROOT[@]}" touch "$UNPACK_ROOT/.libs-ok"
  # exim4-base's postinst: the Debian-exim system user and group (the name is compiled into exim).
  getent passwd Debian-exim >/dev/null || "${AS_ROOT[@]}" adduser --system --group --quiet --home /var/spool/exim4 \
    --no-create-home --disabled-login --force-badname Debian-exim >>"$unpack_log" 2>&1 || unpack_fail "adduser Debian-exim failed"
  # opensmtpd's postinst: groups and users opensmtpd (smtpd's unprivileged processes) and opensmtpq (its queue).
  for name in opensmtpd opensmtpq; do
    getent group "$name" >/dev/null || "${AS_ROOT[@]}" addgroup --system --quiet "$name" >>"$unpack_log" 2>&1 \
      || unpack_fail "addgroup $name failed"
    getent passwd "$name" >/dev/null || "${AS_ROOT[@]}" adduser --system --quiet --home /var/lib/opensmtpd/empty \
      --no-create-home --disabled-password --ingroup "$name" "$name" >>"$unpack_log" 2>&1 || unpack_fail "adduser $name failed"
  done
  "${AS_ROOT[@]}" mkdir -p /var/lib/opensmtpd/empty
  # smtpd runs its delivery helpers (mail.maildir, ...) from this compiled-in path.
  if [[ ! -e /usr/libexec/opensmtpd || -L /usr/libexec/opensmtpd ]]; then
    "${AS_ROOT[@]}" mkdir -p /usr/libexec
    "${AS_ROOT[@]}" ln -sfn "$UNPACK_ROOT/opensmtpd/usr/libexec/opensmtpd" /usr/libexec/opensmtpd
  fi
  unpacked_ready || unpack_fail "Exim/OpenSMTPD still not ready after unpacking"
  rm -f "$unpack_log"
fi

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
