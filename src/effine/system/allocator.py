"""The heap allocator of a training process: jemalloc when it can be found, glibc malloc otherwise.

Why: PyTorch's CPU tensors come from the C heap, and a training step allocates and frees the same large buffers
(activations, gradients, loss chunks) over and over. glibc malloc keeps freed chunks in fragmented arenas, so the
process's resident memory ends well above the bytes actually alive at the peak. jemalloc's size-class extents
reuse those buffers closely. Measured with ``bench/worker_effine.py`` on 2 cores, 2 interleaved pairs each
(``bench/results/allocator.md``): peak RSS above the loaded model -18% on Gemma-3-270M (1,593 -> 1,303 MB) and
-10% on SmolLM2-135M chat (1,531 -> 1,387 MB), tokens/s +1.5-4.7% / +4-6%, bit-identical losses.

The configuration matters: ``dirty_decay_ms:-1,muzzy_decay_ms:-1`` (never give freed pages back to the OS while
training; jemalloc's default purges them after 10 s and then pays page faults to get them back: -7% tokens/s).

How: ``effine train`` calls :func:`ensure` before anything else; when jemalloc is not loaded yet and a
``libjemalloc.so.2`` is found, the process re-executes itself with the library in ``LD_PRELOAD`` (an allocator
cannot be swapped once the process has allocated). Where it looks: ``$EFFINE_JEMALLOC``, the effine cache
(``$EFFINE_CACHE/lib``, where ``make setup`` / ``python -m effine.system.allocator --fetch`` unpacks Debian's
``libjemalloc2`` without root), then the system library directories.

Switches: ``EFFINE_ALLOCATOR=system`` keeps glibc; ``EFFINE_ALLOCATOR=jemalloc`` makes a missing jemalloc an error;
``auto`` (default) uses jemalloc when found. A ``MALLOC_CONF`` already in the environment is kept as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODE_VAR = "EFFINE_ALLOCATOR"
LIB_VAR = "EFFINE_JEMALLOC"
REEXEC_VAR = "EFFINE_ALLOCATOR_REEXEC"  # set on the re-executed process: never loop
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
LIB_NAME = "libjemalloc.so.2"
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
               "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")


def _mode() -> str:
    return os.environ.get(MODE_VAR, "auto").strip().lower()


def _cache_lib_dir() -> Path:
    from effine.system.paths import cache_root  # no torch import: this runs before the re-exec

    return cache_root() / "lib"


def loaded() -> str | None:
    """The path of the jemalloc this process has mapped, or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        if "libjemalloc" in line:
            return line.split()[-1]
    return None


def find_jemalloc() -> Path | None:
    """``$EFFINE_JEMALLOC``, else ``$EFFINE_CACHE/lib/libjemalloc.so.2``, else the first system copy found."""
    explicit = os.environ.get(LIB_VAR)
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    for d in (_cache_lib_dir(), *map(Path, SYSTEM_DIRS)):
        if (d / LIB_NAME).is_file():
            return d / LIB_NAME
    return None


def ensure() -> None:
    """Re-execute this process under jemalloc when the mode allows it and a library is found (see module doc).

    Returns normally when nothing is to be done; otherwise does not return (``os.execve``). Raises
    :class:`~effine.errors.ConfigError` for ``EFFINE_ALLOCATOR=jemalloc`` without a library, or an unknown mode.
    """
    from effine.errors import ConfigError

    mode = _mode()
    if mode not in ("auto", "jemalloc", "system"):
        raise ConfigError(f"{MODE_VAR}={mode!r}: use auto, jemalloc or system.")
    if mode == "system" or loaded() or os.environ.get(REEXEC_VAR) or not sys.platform.startswith("linux"):
        return
    lib = find_jemalloc()
    if lib is None:
        if mode == "jemalloc":
            raise ConfigError(f"{MODE_VAR}=jemalloc but no {LIB_NAME} was found (looked in ${LIB_VAR}, "
                              f"{_cache_lib_dir()}, {', '.join(SYSTEM_DIRS)}): run `python -m effine.system.allocator "
                              "--fetch`, install your system's jemalloc package, or set EFFINE_ALLOCATOR=auto.")
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(lib)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[REEXEC_VAR] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot exec (unusual sandbox): go on with glibc
        return


def will_use_jemalloc() -> bool:
    """Whether a training process started now would run under jemalloc (what :func:`ensure` would do)."""
    mode = _mode()
    if mode == "system" or not sys.platform.startswith("linux"):
        return False
    return bool(loaded()) or find_jemalloc() is not None


def describe() -> str:
    """One line for the run log: which allocator this process runs with."""
    lib = loaded()
    if lib:
        return f"allocator: jemalloc ({lib}, MALLOC_CONF={os.environ.get('MALLOC_CONF', '')})"
    if _mode() == "system":
        return f"allocator: glibc malloc ({MODE_VAR}=system)"
    return ("allocator: glibc malloc (no jemalloc found; `python -m effine.system.allocator --fetch` gets one: "
            "~10-18% lower peak memory and a few % faster on CPU)")


def fetch(dest: Path | None = None) -> Path | None:
    """Put a ``libjemalloc.so.2`` into the effine cache without root: Debian/Ubuntu's ``libjemalloc2`` package,
    downloaded with ``apt-get download`` and unpacked with ``dpkg -x``. Returns its path, or None (with the reason
    printed) when this system has no apt or the download fails."""
    dest = dest or _cache_lib_dir()
    if (dest / LIB_NAME).is_file():
        return dest / LIB_NAME
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        print("effine: no apt-get/dpkg here; install jemalloc with your package manager and set "
              f"{LIB_VAR}=/path/to/{LIB_NAME} (optional: effine runs with glibc malloc without it)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "libjemalloc2"], cwd=tmp, check=True, capture_output=True,
                           timeout=120)
            deb = next(Path(tmp).glob("libjemalloc2_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True, capture_output=True,
                           timeout=60)
            found = next((Path(tmp) / "x").rglob(LIB_NAME))
        except (subprocess.SubprocessError, StopIteration, OSError) as e:
            print(f"effine: could not fetch jemalloc ({type(e).__name__}); effine runs with glibc malloc")
            return None
        dest.mkdir(parents=True, exist_ok=True)
        part = dest / (LIB_NAME + ".part")
        shutil.copy2(found.resolve(), part)
        part.replace(dest / LIB_NAME)
    return dest / LIB_NAME


if __name__ == "__main__":
    if sys.argv[1:] == ["--fetch"]:
        path = fetch()
        print(f"effine: jemalloc at {path}" if path else "effine: jemalloc not installed")
        sys.exit(0)
    print(describe())
