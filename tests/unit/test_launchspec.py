"""A hand-damaged kernel.json (or instance record) is one sentence naming the field and the fix, for every
consumer: the launcher, doctor, gc, instances and the reaper. Never a traceback, never a reaper that dies."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, gc, kernelspec, paths, procfs, registry, specdirs
from hpc_kernels.kernelspec import launcher_argv
from hpc_kernels.launchspec import KernelSpecError, from_json, read_kernel_json
from hpc_kernels.model import LaunchSpec
from hpc_kernels.runtimes.apptainer import instance as app_instance
from hpc_kernels.runtimes.apptainer import reaper as app_reaper
from hpc_kernels.runtimes.apptainer import records as app_records
from hpc_kernels.runtimes.apptainer import sweep as app_sweep

MakeRegistry = Callable[..., Path]

GOOD = LaunchSpec(kernel="sci", runtime="apptainer", mode="instance", image="/img/sci.sif",
                  command=("python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                  binds=("/project",), env=(("A", "1"),), pass_env=("MY_*",), idle_timeout=30.0).to_json()

DAMAGE = [
    ({"binds": None}, "'binds' must be a list of bind specs (src[:dst[:opts]]), not null"),
    ({"binds": ["/a:/b:ro:x"]}, "'binds' must be a list of bind specs"),
    ({"image": None}, "'image' must be the path of the kernel's image, not null"),
    ({"idle_timeout": "abc"}, "'idle_timeout' must be a number of seconds (>= 0), not 'abc'"),
    ({"idle_timeout": -1}, "'idle_timeout' must be a number of seconds (>= 0), not -1"),
    ({"idle_timeout": True}, "'idle_timeout' must be a number of seconds (>= 0), not true"),
    ({"command": ["python3"]}, "'command' must be a list of strings with the argument '{connection_file}'"),
    ({"command": "python3 -m ipykernel"}, "'command' must be a list of strings"),
    ({"env": {"1BAD": "x"}}, "'env' must be an object of variable name to string, not an object"),
    ({"env": {"A": 1}}, "'env' must be an object of variable name to string"),
    ({"env": []}, "'env' must be an object of variable name to string, not an empty list"),
    ({"pass_env": ["MY*X"]}, "'pass_env' must be a list of variable names"),
    ({"runtime": "lxc"}, "'runtime' must be one of apptainer, docker, podman, not 'lxc'"),
    ({"mode": None}, "'mode' must be one of exec, instance, not null"),
    ({"gpu": "yes"}, "'gpu' must be one of auto, nvidia, rocm, none"),
    ({"runtime_args": [1]}, "'runtime_args' must be a list of strings, not a list"),
    ({"container_image": 3}, "'container_image' must be a container image name or null, not 3"),
    ({"runtime_hint": None}, "'runtime_hint' must be a string, not null"),
]


@pytest.mark.parametrize(("change", "expected"), DAMAGE)
def test_every_field_is_checked_and_named(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(KernelSpecError) as info:
        from_json({**GOOD, **change})
    assert expected in str(info.value)
    assert str(info.value).endswith("; reinstall with 'hpc-kernels install sci'.")


def test_missing_fields_and_other_formats() -> None:
    without_image = {k: v for k, v in GOOD.items() if k != "image"}
    with pytest.raises(KernelSpecError, match=r"it has no 'image' \(the path of the kernel's image\)"):
        from_json(without_image)
    # A bad kernel name cannot name the fix: the caller's name (the kernelspec directory) does.
    with pytest.raises(KernelSpecError, match=r"'kernel' must be a kernel name .*install dirname'\.$"):
        from_json({**GOOD, "kernel": "Bad Name"}, "dirname")
    for data in (None, [], {**GOOD, "format": 99}):
        with pytest.raises(KernelSpecError, match="not a launch spec of this version"):
            from_json(data)
    # Optional fields may be absent (kernelspecs of earlier versions), unknown ones are ignored.
    minimal = {k: GOOD[k] for k in ("format", "kernel", "runtime", "mode", "image", "command")}
    assert from_json({**minimal, "installed_by": "x"}).binds == ()
    assert from_json(GOOD) == from_json(json.loads(json.dumps(GOOD)))


def test_read_kernel_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sci" / "kernel.json"
    path.parent.mkdir()
    for text, expected in [
        ("", "is damaged: not valid JSON"),
        ("\xff\xfe", "is damaged: not valid JSON"),
        ("[1, 2]", "was not written by hpc-kernels"),
        ('{"metadata": null}', "was not written by hpc-kernels"),
        (json.dumps({"metadata": {"hpc_kernels": {**GOOD, "binds": None}}}), "is damaged: 'binds' must be"),
    ]:
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(KernelSpecError) as info:
            read_kernel_json(str(path))
        assert str(info.value).startswith(f"the kernelspec {path} ") and expected in str(info.value)
        assert "'hpc-kernels install sci'" in str(info.value)
        assert not specdirs.is_ours(path.parent) or "damaged: '" in str(info.value)


# ----------------------------------------------------------------------------- consumers


def damaged_install(make_registry: MakeRegistry, tmp_path: Path, change: dict[str, Any]) -> tuple[Path, Path]:
    """Install kernels 'bad' and 'good' (both with existing images), then damage 'bad''s kernel.json."""
    image = tmp_path / "k.sif"
    image.write_bytes(b"sif")
    path = make_registry(f"kernels:\n  bad:\n    image: {image}\n    mode: instance\n"
                         f"  good:\n    image: {image}\n")
    for entry in registry.load_file(path).kernels:
        kernelspec.install(entry, specdirs.Target(), path)
    spec_file = specdirs.installed_ours()["bad"] / "kernel.json"
    data = json.loads(spec_file.read_text())
    data["metadata"]["hpc_kernels"].update(change)
    for key in [k for k, v in change.items() if v is KeyError]:
        del data["metadata"]["hpc_kernels"][key]
    spec_file.write_text(json.dumps(data))
    return path, spec_file


CHANGES = [{"binds": None}, {"image": KeyError}, {"idle_timeout": "abc"}]


@pytest.mark.parametrize("change", CHANGES)
def test_the_launcher_says_which_field_in_one_sentence(make_registry: MakeRegistry, tmp_path: Path,
                                                       change: dict[str, Any]) -> None:
    _path, spec_file = damaged_install(make_registry, tmp_path, change)
    done = subprocess.run([*launcher_argv(), str(spec_file), str(tmp_path / "conn.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"hpc-kernels: the kernelspec {spec_file} is damaged: ")
    assert line.endswith("reinstall with 'hpc-kernels install bad'.")
    assert f"'{next(iter(change))}'" in line


@pytest.mark.parametrize("change", CHANGES)
def test_doctor_reports_it_and_goes_on(make_registry: MakeRegistry, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], change: dict[str, Any]) -> None:
    path, spec_file = damaged_install(make_registry, tmp_path, change)
    capsys.readouterr()
    assert cli.main(["doctor", "--json", "--registry", str(path)]) == 1
    report = json.loads(capsys.readouterr().out)
    bad = [f for f in report["findings"] if f["check"] == "launcher" and f["kernel"] == "bad"]
    assert [f["status"] for f in bad] == ["fail"]
    assert bad[0]["message"].startswith(f"the kernelspec {spec_file} is damaged: ")
    assert f"'{next(iter(change))}'" in bad[0]["message"]
    assert bad[0]["fix"] == "hpc-kernels install bad"
    assert any(f["check"] == "launcher" and f["kernel"] == "good" for f in report["findings"])


def test_doctor_reports_a_damaged_argv(make_registry: MakeRegistry, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path, spec_file = damaged_install(make_registry, tmp_path, {})
    data = json.loads(spec_file.read_text())
    data["argv"] = None
    spec_file.write_text(json.dumps(data))
    capsys.readouterr()
    assert cli.main(["doctor", "--json", "--registry", str(path), "bad"]) == 1
    bad = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["check"] == "launcher"]
    assert "'argv' must be a list of strings" in bad[0]["message"]


@pytest.mark.parametrize("change", CHANGES)
def test_gc_reports_it_and_goes_on(make_registry: MakeRegistry, tmp_path: Path, change: dict[str, Any]) -> None:
    _path, spec_file = damaged_install(make_registry, tmp_path, change)
    (tmp_path / "k.sif").unlink()  # 'good' is now a kernelspec whose image is gone
    found = gc.sweep_kernelspecs(dry_run=False)
    assert [(f.target, f.action) for f in found] == [("bad", "left alone"), ("good", "removed")]
    assert found[0].reason.startswith(f"the kernelspec {spec_file} is damaged")
    assert spec_file.exists()


def test_show_and_list_report_it(make_registry: MakeRegistry, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path, spec_file = damaged_install(make_registry, tmp_path, {"binds": None})
    assert cli.main(["show", "--registry", str(path), "bad"]) == 1
    assert f"the kernelspec {spec_file} is damaged: 'binds'" in capsys.readouterr().err
    spec_file.write_text('{"metadata": null}')  # not even recognisable as ours any more
    assert cli.main(["list", "--registry", str(path), "--json"]) == 0


# ----------------------------------------------------------------------------- instance records


def damaged_record(idle_timeout: Any = "abc") -> Path:
    """An instance record as an earlier version wrote it from a kernel.json with idle_timeout "abc",
    naming a live process (this test's) so that the record looks like a running instance."""
    name = app_instance.Identity("u", "py", "h", "", app_instance.owner_tag(), "0badf00d").name
    d = app_instance.instance_dir(name)
    (d / app_instance.KERNELS).mkdir(parents=True)
    me = procfs.proc_ref(os.getpid())
    assert me is not None
    record = app_records.InstanceRecord(name, "py", "/i.sif", "u", paths.hostname(), "", me.pid,
                                      me.start, 1.0, 30.0, "/nonexistent/apptainer")
    (d / app_instance.RECORD).write_text(json.dumps({**asdict(record), "idle_timeout": idle_timeout}))
    return d


def test_the_reaper_survives_a_damaged_record_and_stops_the_instance(capsys: pytest.CaptureFixture[str]) -> None:
    d = damaged_record()
    assert app_records.read_record(d) is None
    assert "'idle_timeout' is 'abc'" in str(app_records.record_problem(d))
    assert app_reaper.reap(d) == 0  # used to die of a TypeError, leaving the instance running forever
    out = capsys.readouterr().out
    assert f"is damaged: 'idle_timeout' is 'abc'; stopping instance {d.name}" in out
    assert not d.exists()


def test_instances_and_gc_report_a_damaged_record(capsys: pytest.CaptureFixture[str]) -> None:
    d = damaged_record()
    capsys.readouterr()
    assert cli.main(["instances"]) == 0
    err = capsys.readouterr().err
    assert "is damaged: 'idle_timeout' is 'abc'" in err and "Traceback" not in err
    assert cli.main(["instances", "--json"]) == 0
    assert "is damaged" in json.loads(capsys.readouterr().out)["problems"][0]
    found = app_sweep.sweep_state(dry_run=True)
    assert [(f.target, f.action) for f in found] == [(d.name, "stopped")]
    assert "is damaged: 'idle_timeout' is 'abc'; its state is removed too" in found[0].reason
    assert "restarted its reaper" not in str(found)
    app_sweep.sweep_state(dry_run=False)
    assert not d.exists()


def test_damaged_attachments_are_skipped() -> None:
    d = damaged_record(idle_timeout=30.0)
    (d / app_instance.KERNELS / "1-2.json").write_text(json.dumps(
        {"id": "1-2", "pid": "abc", "pid_start": 1, "connection_file": "/c.json", "attached_at": 1.0}))
    assert app_records.attachments(d) == []
    assert app_records.read_record(d) is not None

