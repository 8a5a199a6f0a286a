"""Packaging: the LICENSE, pyproject.toml's metadata (one version, shared with the package),
the README's install command (no setuptools pin), and setup.py's choice of extension: a torch
with CUDA but no nvcc still builds the C++ extension (Triton covers the GPU) and says why.

setup.py's decision is tested without building anything: the module is loaded under another
name (its ``setup()`` call runs only as ``__main__``) and given fake CUDA versions and homes.
The install itself (``pip install -e . --no-build-isolation`` with setuptools >= 80 in a fresh
clone) is too slow for the suite; README's Set up section says how it was checked.
"""
import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _pyproject():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.fixture
def setup_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("vsam_ext_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)             # not __main__: setup() does not run
    monkeypatch.chdir(ROOT)                  # the sources are found relative to the project
    monkeypatch.delenv("VSAM_EXT_NO_CUDA", raising=False)
    return mod


def test_license_is_bsd_3_clause():
    text = _read("LICENSE")
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c)" in text and "the vsam_ext authors" in text
    for clause in ("Redistributions of source code must retain", "Redistributions in binary form must reproduce",
                   "Neither the name of the copyright holder", 'PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"'):
        assert clause in text


def test_pyproject_metadata():
    pp = _pyproject()
    project = pp["project"]
    assert project["name"] == "vsam_ext"
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    assert project["readme"] == "README.md" and project["description"]
    assert project["requires-python"].startswith(">=3.")
    deps = project["dependencies"]
    assert "torch>=2.4" in deps and "numpy" in deps and not any(d.startswith("triton") for d in deps)
    extras = project["optional-dependencies"]
    assert {"pytest", "hypothesis"} <= set(extras["test"]) and extras["triton"] == ["triton"]
    # one version: pyproject takes it from the package, setup.py gives none of the metadata
    assert "version" not in project and "version" in project["dynamic"]
    assert pp["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vsam_ext.__version__"}
    setup_py = _read("setup.py")
    for key in ("version=", "name=", "install_requires=", "python_requires="):
        assert key not in setup_py, key
    init = _read(os.path.join("vsam_ext", "__init__.py"))
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', init, re.M)   # a literal: read without importing
    build = pp["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in build["requires"])   # PEP 639 license
    assert not any(r.startswith("torch") for r in build["requires"])   # built against the installed torch


def test_installed_version_matches_the_package():
    metadata = pytest.importorskip("importlib.metadata")
    import vsam_ext
    try:
        installed = metadata.version("vsam_ext")
    except metadata.PackageNotFoundError:
        pytest.skip("vsam_ext is not installed (only on the path)")
    assert installed == vsam_ext.__version__


def _readme_block(marker):
    lines, out, state = _read("README.md").splitlines(), [], 0
    for line in lines:
        if state == 0 and line == f"<!-- ci:{marker} -->":
            state = 1
        elif state == 1 and line.startswith("```bash"):
            state = 2
        elif state == 2 and line.startswith("```"):
            break
        elif state == 2:
            out.append(line)
    return "\n".join(out)


def test_readme_install_needs_no_setuptools_cap():
    cmd = _readme_block("install")
    assert "pip install -e . --no-build-isolation" in cmd
    assert not re.search(r"setuptools\s*<", cmd), cmd          # no "setuptools<80" pin any more
    readme = _read("README.md")
    assert "VSAM_EXT_NO_CUDA" in readme and "LICENSE" in readme


def _nvcc_home(tmp_path):
    os.makedirs(tmp_path / "cuda" / "bin")
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("#!/bin/sh\n")
    return str(tmp_path / "cuda")


def test_choose_extension(setup_module, tmp_path):
    choose = setup_module.choose_extension
    home = _nvcc_home(tmp_path)
    assert choose(torch_cuda="12.8", cuda_home=home, have_cu=True, no_cuda=False)[0] == "cuda"
    assert choose(torch_cuda=None, cuda_home=home, have_cu=True, no_cuda=False)[0] == "cpp"
    assert choose(torch_cuda="12.8", cuda_home=home, have_cu=False, no_cuda=False)[0] == "cpp"
    kind, why = choose(torch_cuda="12.8", cuda_home=home, have_cu=True, no_cuda=True)
    assert kind == "cpp" and "VSAM_EXT_NO_CUDA" in why
    # a CUDA torch, no CUDA toolkit (CUDA_HOME unknown, or a runtime-only /usr/local/cuda): C++ only,
    # and the message says why, that Triton covers the GPU, and how to get the CUDA kernels or silence it
    for cuda_home in (None, str(tmp_path)):
        kind, why = choose(torch_cuda="12.8", cuda_home=cuda_home, have_cu=True, no_cuda=False)
        assert kind == "cpp"
        for word in ("nvcc", "CUDA_HOME", "Triton", "VSAM_EXT_NO_CUDA"):
            assert word in why, (word, why)


def test_no_cuda_env_values(setup_module, monkeypatch):
    for value, on in (("1", True), ("true", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("VSAM_EXT_NO_CUDA", value)
        assert setup_module.no_cuda_requested() is on, value


def test_cuda_torch_without_nvcc_builds_the_cpp_extension(setup_module, monkeypatch, capsys):
    """The whole choice as the build makes it, with a faked CUDA torch and no CUDA toolkit."""
    import torch
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    ext_modules, cmdclass = setup_module.extensions()
    (ext,) = ext_modules
    assert ext.name == "vsam_ext._C"
    assert ext.sources and all(s.endswith(".cpp") for s in ext.sources)
    assert "build_ext" in cmdclass
    err = capsys.readouterr().err
    assert "C++" in err and "nvcc" in err and "Triton" in err
    # with VSAM_EXT_NO_CUDA=1 the same, whatever the toolkit
    monkeypatch.setenv("VSAM_EXT_NO_CUDA", "1")
    (ext,) = setup_module.extensions()[0]
    assert all(s.endswith(".cpp") for s in ext.sources)
    assert "VSAM_EXT_NO_CUDA" in capsys.readouterr().err


def test_build_flags_still_come_from_compile_flags_json(setup_module, monkeypatch):
    import json

    import torch
    monkeypatch.setattr(torch.version, "cuda", None)
    (ext,) = setup_module.extensions()[0]
    with open(os.path.join(ROOT, "csrc", "compile_flags.json")) as f:
        flags = json.load(f)
    args = ext.extra_compile_args
    args = args["cxx"] if isinstance(args, dict) else args
    assert all(flag in args for flag in flags["cxx"])
