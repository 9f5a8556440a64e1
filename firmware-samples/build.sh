#!/usr/bin/env bash
# Rebuild every Uptake sample firmware image from src/, reproducibly.
#
#   ./build.sh           build into build/ (git-ignored), copy the images to
#                        <hardware-id>/<version>/ and rewrite SHA256SUMS
#   ./build.sh --check   build in a scratch directory and compare the result
#                        with the committed SHA256SUMS (exit 1 on mismatch)
#
# Same toolchain + same sources => same bytes: no timestamps or build paths
# end up in the images (-ffile-prefix-map, --build-id=none, stripped ELF,
# raw .bin).  The images were made with Debian 12 (bookworm) packages:
#   gcc-arm-none-eabi 15:12.2.rel1-1, binutils-arm-none-eabi 2.40-2+18+b1
#   gcc-aarch64-linux-gnu 4:12.2.0-3 (gcc 12.2.0-14), binutils-aarch64-linux-gnu 2.40-2
# Other versions build fine but will most likely give different bytes.
set -euo pipefail
export LC_ALL=C TZ=UTC SOURCE_DATE_EPOCH=0

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
src=$here/src

mode=install
case "${1:-}" in
    "") ;;
    --check) mode=check ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

ARM_CC=${ARM_CC:-arm-none-eabi-gcc}
ARM_OBJCOPY=${ARM_OBJCOPY:-arm-none-eabi-objcopy}
A64_CC=${A64_CC:-aarch64-linux-gnu-gcc}
for tool in "$ARM_CC" "$ARM_OBJCOPY" "$A64_CC"; do
    if ! command -v "$tool" >/dev/null; then
        echo "build.sh: '$tool' not found; on Debian/Ubuntu:" >&2
        echo "  apt-get install -y gcc-arm-none-eabi binutils-arm-none-eabi gcc-aarch64-linux-gnu" >&2
        exit 2
    fi
done

expect_version() { # tool, expected first line of --version
    local got
    got=$("$1" --version | head -n1)
    if [[ "$got" != "$2" ]]; then
        echo "build.sh: warning: $1 is '$got', the committed images used '$2';" \
             "expect different bytes" >&2
    fi
}
expect_version "$ARM_CC" "arm-none-eabi-gcc (15:12.2.rel1-1) 12.2.1 20221205"
expect_version "$A64_CC" "aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0"

if [[ $mode == check ]]; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
else
    build=${BUILD_DIR:-$here/build}
    rm -rf "$build"
    mkdir -p "$build"
fi
out=$build/images

# Flags shared by both targets.  -fno-tree-loop-distribute-patterns stops GCC
# from turning our own memset/memcpy loops into calls to themselves.
CFLAGS_COMMON=(
    -std=gnu11 -Os -g0 -Wall -Wextra -Werror
    -ffreestanding -fno-tree-loop-distribute-patterns
    -ffunction-sections -fdata-sections
    "-ffile-prefix-map=$here=."
    -I "$src/common"
)

# version -> value of UPTAKE_SELFTEST_FAULT (0 = healthy).  2.0.0 is the
# demo's broken release: its power-on self-test fails with this code.
declare -A BMS_FAULT=([1.0.0]=0 [1.1.0]=0 [2.0.0]=0x0102)
declare -A GW_FAULT=([1.0.0]=0 [1.1.0]=0 [2.0.0]=0x0203)

version_defines() { # version, fault code
    local major minor patch
    IFS=. read -r major minor patch <<<"$1"
    echo "-DFW_VERSION_MAJOR=$major -DFW_VERSION_MINOR=$minor -DFW_VERSION_PATCH=$patch -DUPTAKE_SELFTEST_FAULT=$2"
}

build_bms() { # version
    local version=$1 obj=$build/stm32f4-bms/$1 dest=$out/stm32f4-bms/$1
    mkdir -p "$obj" "$dest"
    # shellcheck disable=SC2046
    "$ARM_CC" "${CFLAGS_COMMON[@]}" $(version_defines "$version" "${BMS_FAULT[$version]}") \
        -mcpu=cortex-m4 -mthumb -mfloat-abi=soft \
        -nostdlib -nostartfiles -T "$src/stm32f4-bms/stm32f4.ld" \
        -Wl,--gc-sections "-Wl,-Map=$obj/bms.map" \
        "$src/stm32f4-bms/startup.c" "$src/stm32f4-bms/bms.c" -lgcc \
        -o "$obj/bms.elf"
    # Raw flash image from 0x08000000; the gap before the fwinfo block is
    # filled like erased flash.
    "$ARM_OBJCOPY" -O binary --gap-fill 0xff "$obj/bms.elf" "$dest/bms.bin"
    chmod 0644 "$dest/bms.bin"
    # An empty .data would be placed at its RAM address and make a 384 MiB
    # "flash image"; catch that (or any runaway growth) here.
    if (( $(stat -c %s "$dest/bms.bin") > 64 * 1024 )); then
        echo "build.sh: stm32f4-bms $version: bms.bin is larger than 64 KiB; check the linker map" >&2
        exit 1
    fi
}

build_gateway() { # version
    local version=$1 dest=$out/rpi-gateway/$1
    mkdir -p "$dest"
    # shellcheck disable=SC2046
    "$A64_CC" "${CFLAGS_COMMON[@]}" $(version_defines "$version" "${GW_FAULT[$version]}") \
        -fno-pie -no-pie -static -nostdlib -nostartfiles \
        -fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables \
        -Wl,--gc-sections -Wl,--build-id=none -Wl,-z,max-page-size=4096 \
        -Wl,-z,noexecstack -s \
        "$src/rpi-gateway/start.S" "$src/rpi-gateway/gateway.c" -lgcc \
        -o "$dest/gateway.elf"
}

for version in 1.0.0 1.1.0 2.0.0; do
    build_bms "$version"
    build_gateway "$version"
done

# Cross-check each image's fwinfo block against its path, with the project's
# stdlib-only reader (skipped when this tree is not inside the repository).
if command -v python3 >/dev/null && [[ -f $repo/uptake/firmware_info.py ]]; then
    for image in "$out"/*/*/*; do
        rel=${image#"$out"/}
        hardware_id=${rel%%/*}
        version=${rel#*/}; version=${version%%/*}
        got=$(PYTHONPATH=$repo python3 -m uptake.firmware_info show "$image")
        if [[ "$got" != "$hardware_id $version "* ]]; then
            echo "build.sh: $rel: fwinfo says '$got'" >&2
            exit 1
        fi
    done
else
    echo "build.sh: note: not checking fwinfo blocks (needs python3 and ../uptake)" >&2
fi

(cd "$out" && find . -type f | sed 's|^\./||' | sort | xargs sha256sum) > "$build/SHA256SUMS"

if [[ $mode == check ]]; then
    if diff -u "$here/SHA256SUMS" "$build/SHA256SUMS"; then
        echo "build.sh: rebuilt images match SHA256SUMS"
    else
        echo "build.sh: rebuilt images differ from the committed SHA256SUMS" >&2
        exit 1
    fi
else
    # These directories hold nothing but build outputs: replace them whole.
    rm -rf "$here/stm32f4-bms" "$here/rpi-gateway"
    cp -R "$out"/. "$here"/
    cp "$build/SHA256SUMS" "$here/SHA256SUMS"
    cat "$here/SHA256SUMS"
fi
