"""Modulefile rendering, the marker rule and the ``module`` command (no Lmod needed here;
tests/real/test_modulefile.py drives the real Lmod)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, modulefile, modulefile_lua
from hpc_kernels.errors import NotOursError, UsageError
from hpc_kernels.templates import GENERATED_MARKER
from tests.helpers import lmod

REGISTRY = """\
kernels:
  demo:
    image: /nonexistent/demo.sif
    command: [python3, -m, ipykernel_launcher, -f, "{connection_file}"]
"""


def config(tmp_path: Path, **kw: object) -> modulefile_lua.ModuleConfig:
    """A group layout: <grp>/modulefiles, <grp>/share/jupyter, <grp>/bin, <grp>/kernels.yaml."""
    grp = tmp_path / "grp"
    values: dict[str, object] = dict(tree=grp / "modulefiles", prefix=grp,
                                     program=Path("/venv/bin/hpc-kernels"), registry=grp / "kernels.yaml")
    values.update(kw)
    return modulefile_lua.ModuleConfig(**values)  # type: ignore[arg-type]


def test_group_tree_paths_are_relative_to_the_modulefile(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    text = modulefile.plan(cfg).files[0].text
    assert text.splitlines()[0].startswith(f"-- {GENERATED_MARKER}")
    assert 'local root = myFileName():match("^(.*)/[^/]+/[^/]+/[^/]+$")' in text
    assert 'prepend_path("JUPYTER_PATH", pathJoin(root, "share/jupyter"))' in text
    assert 'prepend_path("PATH", pathJoin(root, "bin"))' in text
    assert 'pushenv("HPC_KERNELS_REGISTRY", pathJoin(root, "kernels.yaml"))' in text
    assert str(tmp_path) not in text.split("]])", 1)[1]  # no absolute path outside the help text
    assert "execute" not in text.replace("execute{}", "")  # jupyter-lmod does not run execute{}
    assert 'add_property("lmod", "sticky")' in text and "JUPYTERHUB_API_TOKEN" in text


def test_outside_paths_stay_absolute_and_forced_relative_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, registry=tmp_path / "elsewhere" / "kernels.yaml")
    text = modulefile.plan(cfg).files[0].text
    assert f'pushenv("HPC_KERNELS_REGISTRY", "{tmp_path}/elsewhere/kernels.yaml")' in text
    assert 'pathJoin(root, "share/jupyter")' in text
    with pytest.raises(UsageError, match="cannot be relative"):
        modulefile.plan(config(tmp_path, registry=tmp_path / "x.yaml", path_style="relative"))
    absolute = modulefile.plan(config(tmp_path, path_style="absolute")).files[0].text
    assert "myFileName" not in absolute and f'"{tmp_path}/grp/share/jupyter"' in absolute


def test_home_tree_is_absolute(tmp_path: Path) -> None:
    cfg = config(tmp_path, tree=Path.home() / "modulefiles", prefix=Path.home() / "pfx", registry=None)
    plan = modulefile.plan(cfg)
    assert not plan.to_json()["relative_paths"]
    assert f'prepend_path("JUPYTER_PATH", "{Path.home()}/pfx/share/jupyter")' in plan.files[0].text
    assert "HPC_KERNELS_REGISTRY is left alone" in plan.files[0].text


def test_apptainer_module_name_and_opt_out(tmp_path: Path) -> None:
    named = modulefile.plan(config(tmp_path, apptainer_module="apptainer/1.4")).files[0].text
    assert 'local apptainer_module = "apptainer/1.4"' in named and "depends_on(apptainer_module)" in named
    none = modulefile.plan(config(tmp_path, apptainer_module=None)).files[0].text
    assert "depends_on" not in none
    with pytest.raises(UsageError):
        config(tmp_path, apptainer_module='x"); os.exit(1) --')
    with pytest.raises(UsageError):
        config(tmp_path, name="../evil")


def test_lua_strings_escape_quotes_and_long_brackets() -> None:
    assert modulefile_lua.lua_string('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert modulefile_lua.lua_long_string("x ]] y") == "[=[\nx ]] y\n]=]"


def test_wrapper_runs_the_program(tmp_path: Path) -> None:
    wrapper = modulefile.plan(config(tmp_path, program=Path("/my venv/bin/hpc-kernels"))).files[1]
    assert wrapper.path == tmp_path / "grp" / "bin" / "hpc-kernels" and wrapper.mode == 0o755
    assert "exec '/my venv/bin/hpc-kernels' \"$@\"" in wrapper.text


def test_write_refuses_foreign_files_and_writes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    stale_plan = modulefile.plan(cfg)  # made before the file appeared: write() must look again
    cfg.modulefile.parent.mkdir(parents=True)
    cfg.modulefile.write_text('setenv("MINE", "1")\n')
    with pytest.raises(NotOursError, match="not written by hpc-kernels"):
        modulefile.write(stale_plan)
    assert cfg.modulefile.read_text() == 'setenv("MINE", "1")\n'
    assert not cfg.wrapper.exists()
    with pytest.raises(NotOursError):
        modulefile.remove(cfg)
    assert cfg.modulefile.exists()


def test_write_rewrite_and_remove_our_files(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    written = modulefile.write(modulefile.plan(cfg))
    assert written == [cfg.modulefile, cfg.wrapper]
    assert cfg.wrapper.stat().st_mode & 0o777 == 0o755
    again = modulefile.plan(cfg)
    assert all(f.exists and f.ours for f in again.files)
    modulefile.write(again)
    assert sorted(p.name for p in cfg.modulefile.parent.iterdir()) == ["0.1.0.lua"]  # no temp file left
    assert modulefile.remove(cfg) == [cfg.modulefile, cfg.wrapper]
    assert not cfg.modulefile.parent.exists()


def test_cli_show_json_writes_nothing(tmp_path: Path, make_registry: Any,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(REGISTRY)
    tree, prefix = tmp_path / "grp" / "modulefiles", tmp_path / "grp"
    rc = cli.main(["module", "show", "--json", "--registry", str(reg), "--dir", str(tree),
                   "--prefix", str(prefix), "--apptainer-module", "apptainer/1.4.5"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["module"] == "container-kernels/0.1.0"
    assert data["registry"] == str(reg) and data["apptainer_module"] == "apptainer/1.4.5"
    assert [f["kind"] for f in data["files"]] == ["modulefile", "wrapper"]
    assert not tree.exists() and not (prefix / "bin").exists()


def test_cli_install_then_foreign_file_is_a_clear_error(tmp_path: Path, make_registry: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    reg = make_registry(REGISTRY)
    tree, prefix = tmp_path / "t", tmp_path / "p"
    args = ["module", "install", "demo", "--registry", str(reg), "--dir", str(tree), "--prefix", str(prefix)]
    assert cli.main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kernels"] == ["demo"] and data["installed_kernelspecs"] == ["demo"]
    assert (prefix / "share/jupyter/kernels/demo/kernel.json").is_file()
    other = tree / "container-kernels" / "2.0.lua"
    other.write_text("-- a site's own module\n")
    assert cli.main([*args, "--module-version", "2.0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and str(other) in err and "Traceback" not in err
    assert cli.main(["module", "install", "--dir", str(tree), "--name", "a/b"]) == 2


def test_parse_lmod_python_output_without_executing_it() -> None:
    code = ('import os\nos.environ["A"] = "1";\nos.environ["B"] = \'\'\ndel os.environ["B"]\n'
            'os.environ["C"] = "x\\"y";\n_mlstatus = True\n')
    setenv, unset, ok = lmod.parse_python(code)
    assert setenv == {"A": "1", "C": 'x"y'} and unset == ("B",) and ok
    result = lmod.Evaluation(setenv, unset, ok)
    assert result.apply({"B": "old", "D": "d"}) == {"A": "1", "C": 'x"y', "D": "d"}
    assert lmod.parse_python("_mlstatus = False\n")[2] is False


#: The documented example in the repository (modulefiles/README.md describes it).
EXAMPLE = Path(__file__).resolve().parents[2] / "modulefiles" / "container-kernels" / "0.1.0.lua"


def example_config() -> modulefile_lua.ModuleConfig:
    """The group layout the example documents: everything under /project/def-pi/hpc-kernels."""
    grp = Path("/project/def-pi/hpc-kernels")
    return modulefile_lua.ModuleConfig(tree=grp / "modulefiles", prefix=grp, program=grp / "venv/bin/hpc-kernels",
                                   registry=grp / "kernels.yaml", version="0.1.0")


def test_repo_example_matches_the_template() -> None:
    text = modulefile.plan(example_config()).files[0].text
    if os.environ.get("HPCK_REGEN_EXAMPLE") == "1":
        EXAMPLE.parent.mkdir(parents=True, exist_ok=True)
        EXAMPLE.write_text(text)
    assert EXAMPLE.read_text() == text, "run: HPCK_REGEN_EXAMPLE=1 pytest tests/unit/test_modulefile.py -k example"
