#!/usr/bin/env bash
# Builds test-images/out/debian-cloud/: a stock Debian bookworm made with debootstrap, with
# cloud-init, systemd and Debian's cloud kernel and initramfs, and no taskvm agent. The image
# build tests configure it purely through NoCloud user-data.
#
#   test-images/debian-cloud.sh OUT
#
# Writes OUT/debian-cloud/{disk.img (raw ext4), vmlinuz, initrd.img, machine.json}. Needs root
# (debootstrap) and Debian's package registry (DEBIAN_MIRROR, default deb.debian.org). The
# downloaded packages are kept in OUT/debootstrap-cache. Not pinned: debootstrap takes what the
# mirror has today, which is fine for a fixture that only has to run cloud-init.
set -euo pipefail
out=$(mkdir -p "$1" && realpath "$1")
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
target="$out/debian-cloud"
work="$out/debian-cloud.work"
cache="$out/debootstrap-cache"
step() { printf 'test-images: %s\n' "$*" >&2; }

# debootstrap mounts the kernel's file systems (proc, sys) inside the root it builds; a run
# that was killed leaves them mounted, and removing the work directory would then walk into
# them. Unmount whatever is below it, deepest first, before removing it and when leaving.
release_mounts() {
  awk -v root="$work/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r point; do umount -l "$point" 2>/dev/null || true; done
}
trap release_mounts EXIT
release_mounts
rm -rf "$work"
mkdir -p "$work/root" "$cache"
# python3-cffi-backend: debootstrap does not resolve the virtual package cloud-init's
# python3-cryptography depends on.
packages=systemd-sysv,udev,cloud-init,python3-cffi-backend,linux-image-cloud-amd64,initramfs-tools,ifupdown,isc-dhcp-client
step "debootstrap bookworm from $mirror (about 2 minutes; packages cached in $cache)"
if ! debootstrap --variant=minbase --cache-dir="$cache" --include="$packages" \
    bookworm "$work/root" "$mirror" > "$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  echo "test-images: debootstrap failed; the whole log is $work/debootstrap.log" >&2
  exit 1
fi
root="$work/root"
echo "/dev/vda / ext4 defaults 0 1" > "$root/etc/fstab"
# A fixture that boots under TCG in the tests: still Debian's own systemd and cloud-init, but
# without what no test looks at (login prompts, periodic timers, the KVM modules udev would
# load for nothing), and with cloud-init in one stage instead of four: each stage is a Python
# start of 10-15 s under TCG. The network stage alone finds the NoCloud seed and runs the
# modules user-data needs (the defaults also generate locales). Side by side: 77 s to power-off
# against 100 s with four stages.
for unit in getty-static.service getty@tty1.service serial-getty@ttyS0.service \
    e2scrub_reap.service systemd-binfmt.service apt-daily.timer apt-daily-upgrade.timer \
    dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
    cloud-init-local.service cloud-config.service cloud-final.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
printf 'blacklist %s\n' kvm kvm_amd kvm_intel powernow_k8 > "$root/etc/modprobe.d/taskvm-fixture.conf"
cat > "$root/etc/cloud/cloud.cfg.d/90-taskvm-fixture.cfg" <<'YAML'
cloud_init_modules: [seed_random, write-files, set_hostname, update_hostname, runcmd,
  scripts-user, final-message, power-state-change]
cloud_config_modules: []
cloud_final_modules: []
YAML
echo debian-cloud > "$root/etc/hostname"
: > "$root/etc/machine-id"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin

step "building the debian-cloud disk"
mkdir -p "$work/image"
cp "$root"/boot/vmlinuz-* "$work/image/vmlinuz"
cp "$root"/boot/initrd.img-* "$work/image/initrd.img"
chmod 0644 "$work/image/vmlinuz" "$work/image/initrd.img"
mkfs.ext4 -q -F -L root -d "$root" "$work/image/disk.img" 1536M > "$work/mkfs.log" 2>&1 || { cat "$work/mkfs.log" >&2; exit 1; }
cat > "$work/image/machine.json" <<'JSON'
{
  "version": 1,
  "chipset": "microvm",
  "cpu": "qemu64",
  "memory": 1024,
  "threads": 1,
  "cores": 1,
  "sockets": 1,
  "network": "virtio-net-device",
  "storage": "virtio-blk-device",
  "graphics": "none",
  "usb": "none",
  "sound": "none",
  "keyboard": "none",
  "mouse": "none",
  "tablet": "none",
  "boot": {
    "kernel": "vmlinuz",
    "initrd": "initrd.img",
    "append": "root=/dev/vda rw console=ttyS0 panic=-1 reboot=t mitigations=off tsc=reliable no_timer_check"
  }
}
JSON
rm -rf "$target"
mv "$work/image" "$target"
rm -rf "$work"
step "debian-cloud: a $(du -h --apparent-size "$target/disk.img" | cut -f1) disk, $(du -h "$target/disk.img" | cut -f1) of it used"
