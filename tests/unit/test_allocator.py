"""effine.system.allocator: finding jemalloc, the switches, and the re-execution of a process under it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from effine.errors import ConfigError
from effine.system import allocator as A

PROBE = ("import sys; from effine.system.allocator import ensure, loaded; ensure(); "
         "print('LOADED', loaded()); print('ARGV', sys.argv[1:])")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in (A.MODE_VAR, A.LIB_VAR, A.REEXEC_VAR, "MALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EFFINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(A, "SYSTEM_DIRS", ())
    return tmp_path


def test_find_order(clean_env, monkeypatch):
    assert A.find_jemalloc() is None
    cached = clean_env / "cache" / "lib" / A.LIB_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert A.find_jemalloc() == cached
    explicit = clean_env / "mine.so"
    explicit.write_bytes(b"")
    monkeypatch.setenv(A.LIB_VAR, str(explicit))
    assert A.find_jemalloc() == explicit
    monkeypatch.setenv(A.LIB_VAR, str(clean_env / "missing.so"))  # an explicit path that does not exist finds nothing
    assert A.find_jemalloc() is None


def test_switches_without_exec(clean_env, monkeypatch):
    monkeypatch.setenv(A.MODE_VAR, "tcmalloc")
    with pytest.raises(ConfigError, match="EFFINE_ALLOCATOR='tcmalloc': use auto, jemalloc or system"):
        A.ensure()
    monkeypatch.setenv(A.MODE_VAR, "jemalloc")
    with pytest.raises(ConfigError, match="no libjemalloc.so.2 was found.*--fetch"):
        A.ensure()
    monkeypatch.setenv(A.MODE_VAR, "auto")
    A.ensure()  # nothing found: returns, this process goes on with glibc
    assert "glibc malloc (no jemalloc found" in A.describe()
    monkeypatch.setenv(A.MODE_VAR, "system")
    A.ensure()
    assert A.describe() == f"allocator: glibc malloc ({A.MODE_VAR}=system)"


def _probe(env: dict) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, "--flag", "x y"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    return lines["LOADED"], lines["ARGV"]


@pytest.mark.skipif(A.find_jemalloc() is None, reason="no jemalloc on this machine (`make setup` fetches one)")
def test_reexec_under_jemalloc_keeps_argv():
    env = {k: v for k, v in os.environ.items() if k not in (A.MODE_VAR, A.REEXEC_VAR, "MALLOC_CONF", "LD_PRELOAD")}
    loaded, argv = _probe(env)
    assert "libjemalloc" in loaded
    assert argv == "['--flag', 'x y']"
    loaded, _ = _probe({**env, A.MODE_VAR: "system"})
    assert loaded == "None"


def test_fetch_without_apt_says_so(clean_env, monkeypatch, capsys):
    monkeypatch.setattr(A.shutil, "which", lambda name: None)
    assert A.fetch(clean_env / "lib") is None
    assert "no apt-get/dpkg here" in capsys.readouterr().out


PURGE = ("import torch; from effine.system.allocator import ensure, loaded; ensure(); "
         "from effine.system.heap import release_free_heap\n"
         "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
         "xs = [torch.ones(256, 1024) for _ in range(200)]\n"
         "before = rss(); del xs; kept = rss(); ok = release_free_heap(); after = rss()\n"
         "print(bool(loaded()), ok, before, kept, after)")


@pytest.mark.skipif(A.find_jemalloc() is None, reason="no jemalloc on this machine (`make setup` fetches one)")
def test_release_free_heap_purges_jemalloc():
    """effine's jemalloc keeps freed pages (no purging while training); release_free_heap (called once after
    quantizing) purges them: RSS falls by most of the 200 MiB freed."""
    env = {k: v for k, v in os.environ.items() if k not in (A.MODE_VAR, A.REEXEC_VAR, "MALLOC_CONF", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PURGE], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    jem, ok, before, kept, after = out[0] == "True", out[1] == "True", *map(int, out[2:])
    assert jem and ok
    assert before - kept < 20 * 2**20  # jemalloc kept the freed pages resident ...
    assert kept - after > 150 * 2**20  # ... until the purge
