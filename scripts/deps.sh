#!/usr/bin/env bash
# Installs the system packages taskvm needs, with apt, as root; does nothing when they are
# all present. Used by `make deps`, which `make demo`, `make test` and CI run first.
set -euo pipefail

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || missing+=(qemu-system-x86)
have qemu-img || missing+=(qemu-utils)
have zstd || missing+=(zstd)
have curl || missing+=(curl)
have lz4 || missing+=(lz4)
have cpio || missing+=(cpio)
have mkfs.ext4 || missing+=(e2fsprogs)
have python3 || missing+=(python3)
have ip || missing+=(iproute2)
have debugfs || missing+=(e2fsprogs)
have nft || missing+=(nftables)
# Building taskvm: the system's zstd (linked statically) and SQLite libraries, found with
# pkg-config, instead of compiling their C sources in every fresh build.
have pkg-config || missing+=(pkg-config)
[ -f /usr/include/zstd.h ] || missing+=(libzstd-dev)
[ -f /usr/include/sqlite3.h ] || missing+=(libsqlite3-dev)
# taskvm serve's console: noVNC, served to the browser.
[ -f /usr/share/novnc/core/rfb.js ] || missing+=(novnc)
# The tests: Chromium for the web UI test, Node.js for playwright-core, venv for schemathesis.
have chromium || missing+=(chromium)
have node || missing+=(nodejs)
have npm || missing+=(npm)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# The image build tests: a stock Debian made with debootstrap, an installer ISO made with
# grub-mkrescue (BIOS grub modules, xorriso, mtools).
have debootstrap || missing+=(debootstrap)
have grub-mkrescue || missing+=(grub-common)
[ -d /usr/lib/grub/i386-pc ] || missing+=(grub-pc-bin)
have xorriso || missing+=(xorriso)
have mformat || missing+=(mtools)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "deps: installing ${missing[*]} with apt-get" >&2
if [ "$(id -u)" -ne 0 ]; then
  if have sudo; then
    SUDO=(sudo)
  else
    echo "deps: missing ${missing[*]}; run 'make deps' as root (apt-get install)" >&2
    exit 1
  fi
else
  SUDO=()
fi

# qemu-system-x86 and qemu-utils must come from the same release. Some images ship a newer
# qemu-utils (backports) whose source is no longer configured; installing qemu-system-x86
# next to it fails or removes it. Ask for both from the distribution's own release, allowing
# the downgrade of a stray qemu-utils.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
packages=()
for package in "${missing[@]}"; do
  case "$package" in
    qemu-system-x86|qemu-utils) ;;
    *) packages+=("$package") ;;
  esac
done
if ! have qemu-system-x86_64 || ! have qemu-img; then
  packages+=(qemu-system-x86 "qemu-utils${codename:+/$codename}")
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends --allow-downgrades "${packages[@]}"
echo "deps: $(qemu-system-x86_64 --version | head -n 1); $(qemu-img --version | head -n 1)" >&2
