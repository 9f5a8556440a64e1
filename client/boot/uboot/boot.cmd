# Uptake A/B boot script for U-Boot (a Raspberry Pi 4 with a 64-bit kernel, as shipped).
#
# Compile:  mkimage -A arm64 -O linux -T script -C none -n "Uptake A/B" -d boot.cmd boot.scr
# and put boot.scr on the FAT boot partition, where U-Boot's distro boot finds it.
#
# The agent and this script share four variables of the U-Boot environment (the agent reads
# and writes them with fw_printenv/fw_setenv, configured by /etc/fw_env.config):
#   boot_slot          a | b   the slot to boot
#   upgrade_available  1 while a new slot is on trial (the agent sets it when it arms
#                      the slot, and clears it when the slot passed its health check)
#   bootcount          trial boots so far (the agent resets it when it arms a slot)
#   bootlimit          trial boots allowed before falling back to the other slot
# Each boot on trial counts; past bootlimit the other (previous, known-good) slot boots
# again and the trial ends. setexpr counts in hex, so the agent keeps bootlimit at 8 or less.
# A U-Boot built with CONFIG_BOOTCOUNT_LIMIT and CONFIG_BOOTCOUNT_ENV counts by itself:
# there, delete the counting block and let altbootcmd switch boot_slot instead.
#
# Which partitions hold the slots (defaults: the SD card's second and third):
#   uptake_dev (mmc), uptake_devnum (0), uptake_part_a (2), uptake_part_b (3),
#   uptake_root_a (/dev/mmcblk0p2), uptake_root_b (/dev/mmcblk0p3), uptake_kernel (boot/Image)

if test -z "${boot_slot}"; then
  setenv boot_slot a
fi
if test -z "${bootlimit}"; then
  setenv bootlimit 3
fi
if test -z "${bootcount}"; then
  setenv bootcount 0
fi

# -- the counting block ------------------------------------------------------------------
if test "${upgrade_available}" = "1"; then
  setexpr bootcount ${bootcount} + 1
  if test ${bootcount} -gt ${bootlimit}; then
    echo "Uptake: slot ${boot_slot} failed ${bootlimit} trial boots; booting the other slot"
    if test "${boot_slot}" = "a"; then
      setenv boot_slot b
    else
      setenv boot_slot a
    fi
    setenv upgrade_available 0
    setenv bootcount 0
  fi
  saveenv
fi

# -- boot the chosen slot ----------------------------------------------------------------
if test -z "${uptake_dev}"; then
  setenv uptake_dev mmc
fi
if test -z "${uptake_devnum}"; then
  setenv uptake_devnum 0
fi
if test -z "${uptake_kernel}"; then
  setenv uptake_kernel boot/Image
fi
if test "${boot_slot}" = "b"; then
  setenv uptake_part ${uptake_part_b}
  setenv uptake_root ${uptake_root_b}
  if test -z "${uptake_part}"; then
    setenv uptake_part 3
    setenv uptake_root /dev/mmcblk0p3
  fi
else
  setenv uptake_part ${uptake_part_a}
  setenv uptake_root ${uptake_root_a}
  if test -z "${uptake_part}"; then
    setenv uptake_part 2
    setenv uptake_root /dev/mmcblk0p2
  fi
fi
echo "Uptake: booting slot ${boot_slot} (${uptake_dev} ${uptake_devnum}:${uptake_part})"
setenv bootargs "${bootargs} root=${uptake_root} rootwait ro"
load ${uptake_dev} ${uptake_devnum}:${uptake_part} ${kernel_addr_r} ${uptake_kernel}
booti ${kernel_addr_r} - ${fdt_addr}
