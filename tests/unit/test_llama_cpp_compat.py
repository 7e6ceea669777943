"""The glibc-compatibility patch for llama-cpp-py-sync's prebuilt library marks a version requirement weak in a copy,
and nothing else: the rest of the file is byte for byte the same, and the installed package is untouched."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from effine.export.llama_cpp_compat import weaken_version_requirement

_SPEC = importlib.util.find_spec("llama_cpp_py_sync")


@pytest.mark.skipif(_SPEC is None, reason="llama-cpp-py-sync is not installed (pip install -e .[test])")
def test_weakens_only_the_glibc_2_38_requirement(tmp_path):
    src = Path(_SPEC.origin).parent / "libllama.so"
    before = src.read_bytes()
    copy = tmp_path / "libllama.so"
    shutil.copy2(src, copy)
    assert weaken_version_requirement(copy) >= 1  # this build asks for GLIBC_2.38 (C23 strtol & co.)
    after = copy.read_bytes()
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(after) == len(before) and 1 <= len(changed) <= 4  # one flag byte per marked requirement
    assert all(after[i] == before[i] | 0x2 for i in changed)  # VER_FLG_WEAK set, nothing else
    assert weaken_version_requirement(copy) == 0 and src.read_bytes() == before


def test_refuses_a_file_that_is_not_elf(tmp_path):
    f = tmp_path / "x.so"
    f.write_bytes(b"not an elf file at all")
    with pytest.raises(ValueError, match="not a little-endian ELF64"):
        weaken_version_requirement(f)
