#!/bin/sh
# check-static.sh BINARY — fail unless BINARY is a statically linked ELF.
#
# The test needs nothing beyond od(1) (coreutils), because `file`, `ldd`
# and binutils' `readelf` may all be missing on a bare machine: an ELF
# executable without a PT_INTERP program header has no dynamic loader, so
# nothing can ever load a shared library into it (a static-pie still has a
# PT_DYNAMIC for relocating itself, but no interpreter). If readelf is
# there, it also must show no NEEDED entry.
#
# Limit: reads the headers in the host's byte order, which is right for
# binaries built for the machine running this.
set -eu

bin=${1:?usage: check-static.sh BINARY}
[ -f "$bin" ] || { echo "check-static: $bin: no such file" >&2; exit 1; }

# number OFFSET SIZE: an unsigned integer of SIZE bytes at OFFSET.
number() {
    od -An -t "u$2" -j "$1" -N "$2" "$bin" | tr -d ' \n'
}

magic=$(od -An -c -N 4 "$bin" | tr -d ' \n')
if [ "$magic" != '177ELF' ]; then
    echo "check-static: $bin: not an ELF file" >&2
    exit 1
fi
case $(number 4 1) in
    1) phoff=$(number 28 4) phentsize=$(number 42 2) phnum=$(number 44 2) ;;
    2) phoff=$(number 32 8) phentsize=$(number 54 2) phnum=$(number 56 2) ;;
    *) echo "check-static: $bin: unknown ELF class" >&2; exit 1 ;;
esac

i=0
while [ "$i" -lt "$phnum" ]; do
    if [ "$(number $((phoff + i * phentsize)) 4)" = 3 ]; then
        echo "check-static: $bin has a program interpreter (PT_INTERP): it is dynamically linked" >&2
        exit 1
    fi
    i=$((i + 1))
done

if command -v readelf >/dev/null 2>&1 && readelf -d "$bin" 2>/dev/null | grep -q '(NEEDED)'; then
    echo "check-static: $bin needs shared libraries:" >&2
    readelf -d "$bin" | grep '(NEEDED)' >&2
    exit 1
fi

echo "$bin: static (no program interpreter, $phnum program headers)"
