#!/usr/bin/env bash
# Builds (or reuses) the Linux guest image that tests/tests/guest_agent_qemu.rs and
# tests/tests/disk_vhost.rs boot under QEMU TCG: the Debian kernel plus an initramfs holding
# busybox-static, the statically linked guest agent and faultline-touch, and the kernel's
# virtio PCI and block modules (in /lib/modules/faultline, loaded by /bin/faultline-modules
# in the order /lib/modules/faultline/ORDER gives; /init does not load them).
#
# Usage: scripts/guest-image.sh [--no-install]
#   Prints machine-readable lines on stdout (logs go to stderr):
#     KERNEL=/abs/path/vmlinuz
#     INITRD=/abs/path/initrd.cpio
#     QEMU=/abs/path/qemu-system-x86_64
#   Cache dir: $FAULTLINE_GUEST_DIR, else ${CARGO_TARGET_DIR:-<repo>/target}/guest-image.
#
# What it installs when missing (needs root; idempotent, does nothing when present):
#   qemu-system-x86 from <codename>-backports (the suite is added to apt's sources with the
#   same mirror as the existing Debian entry: the distribution's own QEMU cannot be
#   installed beside the machine's newer qemu-utils), busybox-static, cpio. The kernel is
#   not installed: `apt-get download` fetches the package linux-image-amd64 depends on and
#   only its /boot is unpacked into the cache dir.
# With --no-install it fails (exit 3) instead of installing anything.
# Exit codes: 0 ready, 3 something needed is missing and may not / cannot be installed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
OUT=${FAULTLINE_GUEST_DIR:-$TARGET_DIR/guest-image}
INSTALL=1
[ "${1:-}" = --no-install ] && INSTALL=0

log() { echo "guest-image: $*" >&2; }
die() {
  log "$*"
  exit 3
}

mkdir -p "$OUT"
# Tests running in parallel (or CI and a test) must not build the image at the same time.
exec 9>"$OUT/.lock"
flock 9

# shellcheck disable=SC1091
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$CODENAME" ] || die "cannot tell the Debian codename from /etc/os-release"
BACKPORTS="$CODENAME-backports"

# --- host packages -------------------------------------------------------------------------

# The main Debian entry of apt's sources (not -security, not a third-party repo): prints
# "URI<TAB>Signed-By" for deb822 files, or "URI<TAB>" for one-line sources.list entries.
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk -v suite="$CODENAME" '
      function flush() {
        if (uris != "" && types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris !~ /security/) {
          split(uris, u, " "); print u[1] "\t" signed; found = 1; exit
        }
        uris = ""; suites = ""; signed = ""; types = ""
      }
      /^[ \t]*$/ { flush(); next }
      /^#/ { next }
      /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
      /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
      /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
      /^Signed-By:/ { sub(/^Signed-By:[ \t]*/, ""); signed = $0 }
      END { if (!found) flush() }
    ' "$f"
  done | head -n1 | grep . && return 0
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    # deb [options] URI suite components...
    awk -v suite="$CODENAME" '
      $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i+1) == suite && $i !~ /security/) { print $i "\t"; exit } }
    ' "$f"
  done | head -n1 | grep .
}

APT_UPDATED=0
apt_update() {
  if [ $APT_UPDATED = 0 ]; then
    log "apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    APT_UPDATED=1
  fi
}

ensure_backports() {
  if grep -rqsE "^[^#]*(Suites:.*[[:space:]]|[[:space:]])$BACKPORTS([[:space:]]|$)" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  local line uri signed
  line=$(debian_mirror) || die "no Debian $CODENAME entry in apt's sources to take the mirror from"
  uri=${line%%$'\t'*}
  signed=${line#*$'\t'}
  log "adding $BACKPORTS ($uri) to apt's sources"
  {
    echo "# Added by faultline scripts/guest-image.sh: QEMU comes from $BACKPORTS."
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: $BACKPORTS"
    echo "Components: main"
    [ -n "$signed" ] && echo "Signed-By: $signed"
  } >"/etc/apt/sources.list.d/faultline-$BACKPORTS.sources"
  APT_UPDATED=0
}

install_pkgs() {
  [ $INSTALL = 1 ] || die "missing: $* (run scripts/guest-image.sh without --no-install, as root)"
  [ "$(id -u)" = 0 ] || die "missing: $* and not root: run scripts/guest-image.sh as root once"
  apt_update
  log "apt-get install $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >"$OUT/apt.log" 2>&1; then
    tail -n 30 "$OUT/apt.log" >&2
    die "apt-get install $* failed (log: $OUT/apt.log)"
  fi
}

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  [ $INSTALL = 1 ] || die "qemu-system-x86_64 missing"
  [ "$(id -u)" = 0 ] || die "qemu-system-x86_64 missing and not root"
  ensure_backports
  install_pkgs -t "$BACKPORTS" qemu-system-x86
fi
# busybox-static: the initramfs needs a statically linked busybox.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
  install_pkgs busybox-static
fi
command -v cpio >/dev/null 2>&1 || install_pkgs cpio
QEMU=$(command -v qemu-system-x86_64)
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing after installing busybox-static"

# --- kernel --------------------------------------------------------------------------------
KERNEL="$OUT/vmlinuz"
MODULES="$OUT/modules"
# Modules the guest may load, with what they depend on (read from each module's .modinfo).
WANT_MODULES="virtio_pci virtio_blk"
# A cache from before the modules were kept has a kernel but no modules: fetch both again,
# so that they match.
if [ ! -s "$KERNEL" ] || [ ! -s "$MODULES/ORDER" ]; then
  [ $INSTALL = 1 ] || die "kernel or its modules not in $OUT yet"
  apt_update
  # linux-image-amd64 is a metapackage; the real kernel is the package it depends on.
  KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  [ -n "$KPKG" ] || die "cannot resolve the package linux-image-amd64 depends on"
  log "downloading $KPKG"
  tmp=$(mktemp -d "$OUT/kernel.XXXXXX")
  # apt-get download writes as the _apt user where it can (else it warns and runs as root).
  chmod 0755 "$tmp"
  chown _apt "$tmp" 2>/dev/null || true
  (cd "$tmp" && apt-get download "$KPKG" >&2) || {
    rm -rf "$tmp"
    die "apt-get download $KPKG failed"
  }
  # Only /boot (vmlinuz + config) and the few modules in WANT_MODULES are kept: the
  # console, serial and PCI drivers are built in; virtio is modular in Debian's kernel.
  mkdir "$tmp/x"
  dpkg -x "$tmp"/*.deb "$tmp/x"
  cp "$tmp"/x/boot/vmlinuz-* "$KERNEL.tmp"
  cp "$tmp"/x/boot/config-* "$OUT/kernel.config" 2>/dev/null || true
  rm -rf "$MODULES.tmp"
  mkdir "$MODULES.tmp"
  ORDER=""
  # Appends module $1 to ORDER after its dependencies, copying it into $MODULES.tmp.
  add_module() {
    local m=$1 f deps d
    case " $ORDER " in *" $m "*) return 0 ;; esac
    f=$(find "$tmp/x/lib/modules" -name "$m.ko" -print -quit)
    [ -n "$f" ] || f=$(find "$tmp/x/lib/modules" -name "$(echo "$m" | tr _ -).ko" -print -quit)
    [ -n "$f" ] || die "module $m is not in $KPKG (compressed modules are not supported)"
    deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$f" | head -n1 | cut -d= -f2 | tr , ' ' || true)
    for d in $deps; do add_module "$d"; done
    cp "$f" "$MODULES.tmp/$m.ko"
    ORDER="$ORDER $m"
  }
  for m in $WANT_MODULES; do add_module "$m"; done
  echo "$ORDER" | tr ' ' '\n' | grep . >"$MODULES.tmp/ORDER"
  echo "$KPKG" >"$OUT/kernel.package"
  rm -rf "$tmp" "$MODULES"
  mv "$MODULES.tmp" "$MODULES"
  mv "$KERNEL.tmp" "$KERNEL"
fi

# --- guest binaries (static) ---------------------------------------------------------------
TRIPLE=x86_64-unknown-linux-gnu
log "building the static guest agent"
(cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" RUSTFLAGS='-C target-feature=+crt-static' \
  "${CARGO:-cargo}" build --quiet --release -p guest-agent --bins --target "$TRIPLE" >&2)
BIN="$TARGET_DIR/$TRIPLE/release"
for b in guest-agent faultline-touch; do
  [ -x "$BIN/$b" ] || die "$BIN/$b missing after the build"
done

# --- initramfs -----------------------------------------------------------------------------
STAGE="$OUT/root"
INITRD="$OUT/initrd.cpio"
# Rebuild only when an input changed (the binaries, busybox, this script's init).
STAMP_NEW=$(cat "$BIN/guest-agent" "$BIN/faultline-touch" "$BUSYBOX" "$0" "$MODULES"/* | sha256sum | cut -d' ' -f1)
if [ ! -s "$INITRD" ] || [ "$(cat "$OUT/initrd.stamp" 2>/dev/null)" != "$STAMP_NEW" ]; then
  log "building $INITRD"
  rm -rf "$STAGE"
  mkdir -p "$STAGE"/{bin,dev,proc,sys,tmp,etc,root}
  cp "$BUSYBOX" "$STAGE/bin/busybox"
  cp "$BIN/guest-agent" "$BIN/faultline-touch" "$STAGE/bin/"
  mkdir -p "$STAGE/lib/modules/faultline"
  cp "$MODULES"/* "$STAGE/lib/modules/faultline/"
  cat >"$STAGE/bin/faultline-modules" <<'EOF'
#!/bin/busybox sh
# Loads the virtio PCI and block modules the initramfs carries, dependencies first.
for m in $(cat /lib/modules/faultline/ORDER); do
  /bin/busybox insmod "/lib/modules/faultline/$m.ko" || echo "faultline-modules: insmod $m failed" >&2
done
EOF
  chmod 0755 "$STAGE/bin/faultline-modules"
  # Debug info is useless in the guest and would triple the initramfs the guest unpacks.
  if command -v strip >/dev/null 2>&1; then
    strip "$STAGE/bin/guest-agent" "$STAGE/bin/faultline-touch"
  fi
  cat >"$STAGE/etc/faultline-agent.conf" <<'EOF'
# faultline guest agent configuration (the initramfs default; the kernel command line can
# override any key with agent.KEY=VALUE).
device = /dev/ttyS1
interval_ms = 1000
report_every_ms = 10000
touch = name:faultline-touch
touch_threads = 4
max_cpu_pct = 5
EOF
  cat >"$STAGE/init" <<'EOF'
#!/bin/busybox sh
# faultline test guest: mount the pseudo file systems, start the touch workload and the
# agent, then stay alive (PID 1 must never exit) reaping children.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "FAULTLINE_INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
touch_mb=64
agent_args=""
for a in $(cat /proc/cmdline); do
  case "$a" in
    touch_mb=*) touch_mb=${a#touch_mb=} ;;
    agent.*=*) agent_args="$agent_args ${a#agent.}" ;;
  esac
done
/bin/faultline-touch "$touch_mb" &
/bin/guest-agent --config /etc/faultline-agent.conf $agent_args &
while true; do
  wait
  sleep 1
done
EOF
  chmod 0755 "$STAGE/init"
  (cd "$STAGE" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  echo "$STAMP_NEW" >"$OUT/initrd.stamp"
fi

echo "KERNEL=$KERNEL"
echo "INITRD=$INITRD"
echo "QEMU=$QEMU"
