#!/usr/bin/env bash
# Installs what the real-QEMU test rig needs on a Debian 12 host, as root, idempotently:
#   - QEMU 7.2 (Debian 12's own), busybox-static, gcc + static libc, prometheus, chromium (the status
#     page's browser test) (apt);
#   - QEMU 10.0 from bookworm-backports, extracted beside 7.2 (never installed over it);
#   - a Debian cloud kernel image, extracted (never installed into the host's /boot).
# Layout under ${MIGPREDICTD_RIG_DIR:-/opt/migpredictd-rig}:
#   qemu-10.0/usr/bin/qemu-system-x86_64   QEMU 10.0 binary (uses the libraries 7.2's install brought)
#   qemu-10.0/data/                         its -L firmware dir (usr/share/qemu + seabios link)
#   kernel/vmlinuz                          the guest kernel
# With --libvirt (the test command; the demo does not need it) also libvirtd, virsh and what building
# libvirt-python needs (libvirt-dev, pkg-config, python3-dev): tests/test_libvirt.py starts libvirtd itself,
# without systemd, and never enables it.
# Every step is skipped when its result is already there; re-running is cheap.
set -euo pipefail

RIG_DIR="${MIGPREDICTD_RIG_DIR:-/opt/migpredictd-rig}"
QEMU10_DIR="${RIG_DIR}/qemu-10.0"
KERNEL_DIR="${RIG_DIR}/kernel"
BACKPORTS_SOURCES=/etc/apt/sources.list.d/migpredictd-bookworm-backports.sources
DEBIAN_SOURCES=/etc/apt/sources.list.d/debian.sources
APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static seabios gcc libc6-dev prometheus acl systemd chromium)

log() { printf 'install-rig: %s\n' "$*" >&2; }

for arg in "$@"; do
    case "${arg}" in
        --libvirt) APT_PACKAGES+=(libvirt-daemon-system libvirt-clients libvirt-dev pkg-config python3-dev) ;;
        *) log "unknown option ${arg} (known: --libvirt)"; exit 2 ;;
    esac
done

if [[ "$(id -u)" -ne 0 ]]; then
    log "must run as root (apt-get, /opt)"; exit 1
fi
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_update_once() {
    if [[ "${apt_updated}" -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}

# 1. bookworm-backports as an apt source. The mirror URI is copied from the host's own
#    debian.sources at run time so that no host name is written into the repository.
if [[ ! -f "${BACKPORTS_SOURCES}" ]]; then
    uris=""; signed_by=""
    if [[ -f "${DEBIAN_SOURCES}" ]]; then
        # The deb822 stanza whose Suites include plain "bookworm" (not -security) is the main archive.
        IFS=$'\t' read -r uris signed_by < <(awk '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""; signed = ""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/)      { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/)    { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
                    if ($i ~ /^Signed-By:/) { signed = $i; sub(/^Signed-By:[ \t]*/, "", signed) }
                }
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++) if (s[j] == "bookworm") { print uris "\t" signed; exit }
            }' "${DEBIAN_SOURCES}") || true
    elif [[ -f /etc/apt/sources.list ]]; then
        # Older one-line format: "deb [opts] URI bookworm main ...".
        uris="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $(i+1) == "bookworm") { print $i; exit } }' \
            /etc/apt/sources.list)" || true
    fi
    if [[ -z "${uris:-}" ]]; then
        log "no 'bookworm' source in ${DEBIAN_SOURCES} or /etc/apt/sources.list"; exit 1
    fi
    log "adding bookworm-backports (URIs copied from ${DEBIAN_SOURCES})"
    {
        echo "Types: deb"
        echo "URIs: ${uris}"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        if [[ -n "${signed_by:-}" ]]; then echo "Signed-By: ${signed_by}"; fi
    } > "${BACKPORTS_SOURCES}"
    apt_updated=0   # the new suite needs its own index (added first, so one update serves both)
fi

# 2. Distribution packages (QEMU 7.2 and the tools to build the guest).
#    Backports has apt priority 100, so these still come from bookworm itself.
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("${pkg}")
    fi
done
if [[ "${#missing[@]}" -gt 0 ]]; then
    apt_update_once
    log "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "apt packages already installed"
fi

# Downloads the named packages (apt-get download, into a scratch dir) and extracts each into $dest.
download_extract() {
    local dest="$1"; shift
    local tmp
    tmp="$(mktemp -d)"
    # apt drops privileges to _apt for downloads; let it write here (else it warns and runs as root).
    if id -u _apt >/dev/null 2>&1; then chown _apt "${tmp}"; fi
    (cd "${tmp}" && apt-get download -qq "$@")
    mkdir -p "${dest}"
    for deb in "${tmp}"/*.deb; do
        dpkg -x "${deb}" "${dest}"
    done
    rm -rf "${tmp}"
}

# 3. QEMU 10.0 from bookworm-backports, extracted (apt would replace 7.2, which we also test).
if [[ ! -x "${QEMU10_DIR}/usr/bin/qemu-system-x86_64" || ! -e "${QEMU10_DIR}/data/bios-256k.bin" ]]; then
    apt_update_once
    log "fetching QEMU from bookworm-backports into ${QEMU10_DIR}"
    staging="${QEMU10_DIR}.partial"
    rm -rf "${staging}"
    download_extract "${staging}" \
        qemu-system-x86/bookworm-backports qemu-system-data/bookworm-backports \
        qemu-system-common/bookworm-backports
    # -L DATA: the new firmware/option ROMs plus SeaBIOS from the distribution package.
    mkdir -p "${staging}/data"
    cp -a "${staging}/usr/share/qemu/." "${staging}/data/"
    ln -sfn /usr/share/seabios/bios-256k.bin "${staging}/data/bios-256k.bin"
    "${staging}/usr/bin/qemu-system-x86_64" --version | head -n1 >&2
    rm -rf "${QEMU10_DIR}"
    mv "${staging}" "${QEMU10_DIR}"
else
    log "QEMU 10 already at ${QEMU10_DIR}"
fi

# 4. A Debian cloud kernel for the guest: small, boots fast, virtio and serial console built in.
if [[ ! -s "${KERNEL_DIR}/vmlinuz" ]]; then
    apt_update_once
    kpkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
    if [[ -z "${kpkg}" ]]; then
        log "cannot resolve linux-image-cloud-amd64 to a kernel package"; exit 1
    fi
    log "fetching kernel ${kpkg}"
    tmpk="$(mktemp -d)"
    download_extract "${tmpk}/x" "${kpkg}"
    mkdir -p "${KERNEL_DIR}"
    vmlinuz="$(find "${tmpk}/x/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)"
    if [[ -z "${vmlinuz}" ]]; then
        log "no boot/vmlinuz-* in ${kpkg}"; rm -rf "${tmpk}"; exit 1
    fi
    cp "${vmlinuz}" "${KERNEL_DIR}/vmlinuz.partial"
    basename "${vmlinuz}" > "${KERNEL_DIR}/VERSION"
    mv "${KERNEL_DIR}/vmlinuz.partial" "${KERNEL_DIR}/vmlinuz"
    rm -rf "${tmpk}"
else
    log "kernel already at ${KERNEL_DIR}/vmlinuz"
fi

log "done: rig in ${RIG_DIR}"
