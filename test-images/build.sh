#!/usr/bin/env bash
# Builds test-images/out/minimal.tar.zst from pinned Debian packages (packages.lock), the
# static guest agent and taskvm's own `image pack`. Offline except for Debian's registry.
#
#   test-images/build.sh TASKVM AGENT OUT
#
# Reproducible: same inputs, same sha256 (fixed SOURCE_DATE_EPOCH, owners, mtimes, ext4 UUID
# and hash seed; cpio --reproducible).
set -euo pipefail
taskvm=$(realpath "$1"); agent=$(realpath "$2"); out=$3
here=$(cd "$(dirname "$0")" && pwd)
export SOURCE_DATE_EPOCH=1700000000 E2FSPROGS_FAKE_TIME=1700000000 LC_ALL=C TZ=UTC
mkdir -p "$out"
out=$(realpath "$out")
debs="$out/debs"
work="$out/work"
rm -rf "$work"
mkdir -p "$debs" "$work/pkg"

step() { printf 'test-images: %s\n' "$*" >&2; }

# 1. The packages, downloaded once into out/debs.
while read -r pin; do
  [ -z "$pin" ] || [ "${pin#\#}" != "$pin" ] && continue
  name=${pin%%=*}; version=${pin#*=}
  file=$(ls "$debs/${name}_"*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$file" ] || [ "$(dpkg-deb -f "$file" Version)" != "$version" ]; then
    step "downloading $pin"
    rm -f "$debs/${name}_"*.deb
    download() { (cd "$debs" && apt-get download -q "$pin" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true); }
    download
    file=$(ls "$debs/${name}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$file" ] && [ "$(id -u)" -eq 0 ]; then
      step "refreshing apt's package lists"
      apt-get update -q >&2 && download
      file=$(ls "$debs/${name}_"*.deb 2>/dev/null | head -n1 || true)
    fi
    [ -n "$file" ] || { echo "test-images: could not download $pin (apt-get update?)" >&2; exit 1; }
  fi
  dpkg-deb -x "$file" "$work/pkg"
done < "$here/packages.lock"

kernel_release=$(ls "$work/pkg/lib/modules")
modules="$work/pkg/lib/modules/$kernel_release/kernel"

# 2. The uncompressed vmlinux (booted through its PVH entry): the bzImage's payload is an
#    LZ4 frame at (setup_sects + 1) * 512 + payload_offset.
step "extracting vmlinux from $kernel_release"
python3 - "$work/pkg/boot/vmlinuz-$kernel_release" "$work/payload.lz4" <<'PY'
import struct, sys
data = open(sys.argv[1], 'rb').read()
setup_sects = data[0x1f1] or 4
offset, length = struct.unpack_from('<II', data, 0x248)
start = (setup_sects + 1) * 512 + offset
open(sys.argv[2], 'wb').write(data[start:start + length - 4])
PY
lz4 -dqf "$work/payload.lz4" "$work/vmlinux"

# 3. Stage 1 initramfs: the agent as /init (it loads the modules, mounts root= and switches
#    into it without starting any other program), the virtio modules and their list.
step "building the initramfs"
initrd="$work/initrd"
mkdir -p "$initrd"/{dev,proc,sys,newroot,modules,etc/taskvm}
install -m 0755 "$agent" "$initrd/init"
: > "$initrd/etc/taskvm/stage1"
for module in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_mmio \
              pci:drivers/virtio/virtio_pci_legacy_dev pci:drivers/virtio/virtio_pci_modern_dev \
              pci:drivers/virtio/virtio_pci drivers/block/virtio_blk net/core/failover \
              drivers/net/net_failover drivers/net/virtio_net drivers/misc/pvpanic/pvpanic-mmio; do
  path=${module#pci:}
  cp "$modules/$path.ko" "$initrd/modules/"
  prefix=${module%%drivers/*}; prefix=${prefix%%net/*}
  echo "${prefix}/modules/$(basename "$path").ko" >> "$initrd/etc/taskvm/modules"
done
find "$initrd" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$initrd" && find . -print0 | sort -z | cpio --null --reproducible -o -H newc -R 0:0 --quiet) > "$work/initrd.img"

# A bare boot of the same kernel for benchmarks: busybox as init prints a marker, powers off.
bare="$work/bare"
mkdir -p "$bare"/{bin,proc}
cp "$work/pkg/bin/busybox" "$bare/bin/busybox"
printf '#!/bin/busybox sh\n/bin/busybox echo "taskvm-bare: ready"\n/bin/busybox poweroff -f\n' > "$bare/init"
chmod 0755 "$bare/init"
find "$bare" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$bare" && find . -print0 | sort -z | cpio --null --reproducible -o -H newc -R 0:0 --quiet) > "$out/bare-initrd.img"

# 4. The root file system: busybox with every applet linked, the agent as /sbin/init.
step "building the root disk"
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc,root,tmp,run,proc,sys,dev,var/tmp}
cp "$work/pkg/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$agent" "$root/sbin/taskvm-agent"
ln -sf taskvm-agent "$root/sbin/init"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
echo taskvm > "$root/etc/hostname"
chmod 1777 "$root/tmp" "$root/var/tmp"
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkfs.ext4 -q -F -b 4096 -L taskvm-root -U 7a5c0f3e-0000-4000-8000-7461736b766d \
  -E root_owner=0:0,hash_seed=7a5c0f3e-0000-4000-8000-746173686564,lazy_itable_init=0,lazy_journal_init=0 \
  -d "$root" "$work/disk.img" 256M > "$work/mkfs.log" 2>&1 || { cat "$work/mkfs.log" >&2; exit 1; }
# mke2fs copies each file's ctime, which no tool here can set: pin it afterwards.
(cd "$root" && find . -printf "sif /%P ctime @$SOURCE_DATE_EPOCH\n") > "$work/ctimes.debugfs"
debugfs -w -f "$work/ctimes.debugfs" "$work/disk.img" > /dev/null 2>&1

# 5. machine.json: microvm, direct boot, the fast command line (loglevel=1 so that panics still
#    reach the console; the engine adds the host's
#    tsc_early_khz).
cat > "$work/machine.json" <<JSON
{
  "version": 1,
  "chipset": "microvm",
  "cpu": "qemu64",
  "memory": 256,
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
    "kernel": "vmlinux",
    "initrd": "initrd.img",
    "append": "root=/dev/vda console=ttyS0 quiet loglevel=1 tsc=reliable no_timer_check noreplace-smp rcupdate.rcu_expedited=1 i8042.noaux i8042.nokbd i8042.nopnp i8042.dumbkbd mitigations=off nokaslr audit=0 random.trust_cpu=on cryptomgr.notests panic=-1 reboot=t"
  }
}
JSON

# 6. Packed by the product's own tool. display.tar.zst is the same system on q35 with a VGA
#    display, booting the bzImage, with the kernel console on the screen too (the agent paints
#    a banner there).
step "packing"
"$taskvm" image pack --disk "$work/disk.img" --disk-format raw --machine "$work/machine.json" \
  --kernel "$work/vmlinux" --initrd "$work/initrd.img" --level 10 -o "$out/minimal.tar.zst" > "$out/minimal.sha256"
python3 - "$work/machine.json" "$work/display-machine.json" <<'PY'
import json, sys
machine = json.load(open(sys.argv[1]))
machine.update(chipset="q35", network="virtio-net-pci", storage="virtio-blk-pci", graphics="VGA")
# A PVH boot of vmlinux leaves the kernel without screen_info, so no VGA console: boot the
# bzImage through the BIOS instead.
machine["boot"]["kernel"] = "vmlinuz"
machine["boot"]["append"] = machine["boot"]["append"].replace("console=ttyS0", "console=tty0 console=ttyS0")
json.dump(machine, open(sys.argv[2], "w"), indent=2)
PY
"$taskvm" image pack --disk "$work/disk.img" --disk-format raw --machine "$work/display-machine.json" \
  --kernel "$work/pkg/boot/vmlinuz-$kernel_release" --initrd "$work/initrd.img" --level 10 -o "$out/display.tar.zst" > "$out/display.sha256"
# 7. installer.iso: a BIOS-bootable ISO (grub-mkrescue) whose "installer" — busybox as init —
#    makes an ext2 file system on the first virtio disk, writes /installed.txt there and
#    powers off. The image build tests install it onto a fresh disk.
step "building installer.iso"
installer="$work/installer"
mkdir -p "$installer"/{bin,proc,sys,dev,mnt,modules} "$work/iso/boot/grub"
cp "$work/pkg/bin/busybox" "$installer/bin/busybox"
installer_modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
for module in $installer_modules; do
  cp "$(find "$modules" -name "$module.ko")" "$installer/modules/"
done
cat > "$installer/init" <<INIT
#!/bin/busybox sh
bb=/bin/busybox
\$bb mount -t proc proc /proc
\$bb mount -t sysfs sys /sys
\$bb mount -t devtmpfs dev /dev
for module in $installer_modules; do \$bb insmod /modules/\$module.ko; done
\$bb echo "taskvm-installer: writing /dev/vda"
if \$bb mke2fs -L installed /dev/vda > /dev/null && \$bb mount -t ext2 /dev/vda /mnt; then
  \$bb echo "installed from the ISO" > /mnt/installed.txt
  \$bb umount /mnt
  \$bb sync
  \$bb echo "taskvm-installer: done"
fi
\$bb poweroff -f
INIT
chmod 0755 "$installer/init"
find "$installer" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$installer" && find . -print0 | sort -z | cpio --null --reproducible -o -H newc -R 0:0 --quiet) > "$work/iso/boot/installer.img"
cp "$work/pkg/boot/vmlinuz-$kernel_release" "$work/iso/boot/vmlinuz"
cat > "$work/iso/boot/grub/grub.cfg" <<'GRUB'
set timeout=0
menuentry "taskvm test installer" {
  linux /boot/vmlinuz console=ttyS0 quiet panic=-1 reboot=t
  initrd /boot/installer.img
}
GRUB
grub-mkrescue -o "$out/installer.iso" "$work/iso" > "$work/grub-mkrescue.log" 2>&1 \
  || { cat "$work/grub-mkrescue.log" >&2; exit 1; }

for name in minimal display; do
  step "$name.tar.zst $(cat "$out/$name.sha256") ($(du -h --apparent-size "$out/$name.tar.zst" | cut -f1))"
done
