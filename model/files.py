"""Files written whole or not at all: a temp file named after its host and process, renamed into place, and the
sweeps that remove the temps of killed writers. Checkpoints, token caches and clean_data's work folders share it."""
import contextlib
import glob
import os
import re
import socket

import torch

TEMP_SUFFIX = re.compile(r"\.tmp\.?(?:(.+)\.)?(\d+)$")  # .tmp.<host>.<pid>; older saves: .tmp.<pid>, LoRA .tmp<pid>


def temp_path(path: str) -> str:
    """Where `path` is written before it is renamed into place. The name holds this host and process (as the token
    caches' temps do, model/data/jsonl.py), so a sweep can tell a killed save's leftovers from a running one's."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), where /proc tells (Linux); else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime; the name may hold spaces
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def writer_may_run(pid: int, modified: float) -> bool:
    """Whether process `pid` may still be writing a temp file last modified at `modified`: it runs, and did not
    start after that write (a process that did merely reuses the pid of a killed writer)."""
    if os.name == "nt":
        return True  # os.kill(pid, 0) would end the process there: never sweep by pid on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it runs
    started = process_start_time(pid)
    return started is None or started <= modified + 1  # /proc/stat's boot time has a resolution of 1 s


def is_stale_temp(path: str) -> bool:
    """A temp file of a save on this host whose writer is gone (killed before it could clean up). Another host's
    temp on a shared disk is never stale from here: only that host can tell whether its writer runs."""
    match = TEMP_SUFFIX.search(os.path.basename(path))
    if match is None or match.group(1) not in (None, socket.gethostname()):
        return False
    try:
        modified = os.path.getmtime(path)
    except OSError:  # removed meanwhile
        return False
    return not writer_may_run(int(match.group(2)), modified)


def remove_stale_temps(paths) -> list[str]:
    removed = []
    for path in paths:
        if is_stale_temp(path):
            with contextlib.suppress(FileNotFoundError):  # another process swept it first
                os.remove(path)
                removed.append(path)
    return removed


def atomic_write(path: str, write, mode: str = "wb"):
    """`write(file)` into a temp file in the same directory, fsync, then rename: a crash leaves the old file
    intact. On any failure (a full disk, Ctrl-C) the temp file is removed, or a full disk would stay full of it;
    temps of this same file left by killed saves go first."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    remove_stale_temps(glob.glob(glob.escape(path) + ".tmp*"))
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError) and error.errno is not None:  # torch's write errors do not name the file
            raise OSError(error.errno, f"{error.strerror}: cannot save {path} (the previous file is untouched)") \
                from error
        raise


def atomic_torch_save(obj, path: str):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str):
    atomic_write(path, lambda f: f.write(text), mode="w")
