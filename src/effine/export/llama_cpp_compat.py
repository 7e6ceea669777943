"""Make the prebuilt llama.cpp of ``llama-cpp-py-sync`` load on a glibc older than the one it was built on.

The wheels are tagged manylinux2014 but their libraries ask for four symbols of glibc 2.38 (C23's
``__isoc23_strtol``, ``__isoc23_strtoul``, ``__isoc23_strtoull``, ``__isoc23_sscanf``: the standard functions
that also accept a ``0b`` prefix), so on Debian 12 (glibc 2.36) ``dlopen`` fails with
"version `GLIBC_2.38' not found". No registry package ships a llama.cpp built for an older glibc (the
llama-cpp-cffi wheel needs GCC 14's libstdc++ as well), so when, and only when, this happens:

1. the package's libraries are copied to ``~/.cache/effine/lib/llama-cpp-<version>/`` and, in each copy, the
   ``GLIBC_2.38`` version requirement is marked *weak* (an ELF flag: a missing weak version is not an error);
2. a four-function shim (``__isoc23_x`` calling ``x``) is compiled with the system C compiler and loaded with
   RTLD_GLOBAL before llama.cpp, so those symbols resolve to it;
3. the copy is loaded. The installed package is never modified.

Where the system glibc is new enough, the package's own library is used unchanged.
"""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

_SHIM_C = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) {
    va_list ap; va_start(ap, f); int r = vsscanf(s, f, ap); va_end(ap); return r;
}
"""
_SHT_GNU_VERNEED = 0x6FFFFFFE
_VER_FLG_WEAK = 0x2


def weaken_version_requirement(path: Path, version: bytes = b"GLIBC_2.38") -> int:
    """Mark ``version`` weak in the ELF64 (little-endian) file's version needs; return how many were marked."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    marked = 0
    for _name, sh_type, _f, _a, off, _size, link, info, _al, _es in sections:
        if sh_type != _SHT_GNU_VERNEED:
            continue
        strtab = sections[link][4]
        entry = off
        for _ in range(info):  # sh_info = number of Verneed entries
            _ver, cnt, _file, aux, nxt = struct.unpack_from("<HHIII", data, entry)
            a = entry + aux
            for _ in range(cnt):
                _hash, flags, _other, name, anext = struct.unpack_from("<IHHII", data, a)
                s = bytes(data[strtab + name: data.index(0, strtab + name)])
                if s == version and not flags & _VER_FLG_WEAK:
                    struct.pack_into("<H", data, a + 4, flags | _VER_FLG_WEAK)
                    marked += 1
                a += anext
            entry += nxt
    if marked:
        path.write_bytes(bytes(data))
    return marked


def _compile_shim(out: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("llama.cpp needs glibc 2.38 symbols and no C compiler is available to provide them "
                           "(install gcc, or use a system with glibc >= 2.38)")
    src = out.with_suffix(".c")
    src.write_text(_SHIM_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def patched_library(pkg_dir: Path, version: str, cache: Path) -> Path:
    """Path of a copy of the package's libllama.so that loads on this glibc (built once, cached)."""
    target = cache / f"llama-cpp-{version}"
    lib = target / "libllama.so"
    done = target / ".ready"
    if not done.is_file():
        target.mkdir(parents=True, exist_ok=True)
        for so in pkg_dir.iterdir():
            if ".so" in so.name and so.is_file():
                shutil.copy2(so, target / so.name)
                weaken_version_requirement(target / so.name)
        _compile_shim(target / "libeffine_c23_shim.so")
        done.write_text("ok\n")
    ctypes.CDLL(str(target / "libeffine_c23_shim.so"), mode=ctypes.RTLD_GLOBAL)
    return lib
