"""Writing never loses or deletes what the code did not write: result files are replaced atomically under a
unique temporary name per writer, and two runs cannot share one output folder."""
import json
import os
import subprocess
import sys
import threading

import pytest

from qwt.cli import LOCK_FILE, hold_output_dir
from qwt.errors import InputError
from qwt.report import atomic_write, save_figure


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    # Before: every writer used the temporary name .x.json.tmp; 800 writes from 4 threads stole each other's
    # temporary file (FileNotFoundError) or interleaved into it (a reader saw invalid JSON).
    target = tmp_path / "x.json"
    atomic_write(target, json.dumps({"writer": -1, "i": -1, "pad": "x" * 4096}))
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(writer: int) -> None:
        try:
            for i in range(200):
                atomic_write(target, json.dumps({"writer": writer, "i": i, "pad": str(writer) * 4096}))
        except BaseException as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    def read() -> None:
        while not stop.is_set():
            try:
                record = json.loads(target.read_text())
                assert record["pad"] == (str(record["writer"]) if record["writer"] >= 0 else "x") * 4096
            except BaseException as err:  # noqa: BLE001
                errors.append(err)
                return

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write(target, "old")

    def refuse(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_chart_that_fails_half_written_leaves_the_old_chart(tmp_path):
    """Charts go through the same staging as text: a figure whose saving stops half-way (a full disk) leaves the
    previous chart byte-identical and nothing else."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    target = tmp_path / "chart.png"
    save_figure(fig, target)
    before = target.read_bytes()

    class DiskFull:
        def savefig(self, path, **kwargs):
            fig.savefig(path, **kwargs)
            path.write_bytes(path.read_bytes()[:64])
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_figure(DiskFull(), target)
    plt.close(fig)
    assert target.read_bytes() == before and before.startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]


def test_result_files_get_the_usual_permissions(tmp_path):
    atomic_write(tmp_path / "x.json", "{}")
    (tmp_path / "plain").write_text("{}")
    assert (tmp_path / "x.json").stat().st_mode == (tmp_path / "plain").stat().st_mode


HOLD = ("import sys; from pathlib import Path; from qwt.cli import hold_output_dir\n"
        "with hold_output_dir(Path(sys.argv[1]), '--out'):\n"
        "    print('held', flush=True); sys.stdin.read()\n")


@pytest.fixture
def held(tmp_path):
    """Another process holding ``tmp_path/out`` as a run would."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    yield out, holder
    holder.kill()
    holder.wait(timeout=30)


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(held, capsys):
    # Before: both runs wrote OUT/<model>_W4A4.json; the last writer won and the table mixed the two runs.
    from qwt.tasks.classification import main

    out, pid = held[0], held[1].pid
    code = main("vit", "", ["--model", "deit_tiny", "--smoke", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"--out {out} is in use by another run (pid {pid}:" in err and "pass another --out" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing computed, nothing written


def test_the_lock_is_released_however_the_holder_ends(held):
    out, holder = held
    with pytest.raises(InputError, match="in use by another run"):
        with hold_output_dir(out, "--out"):
            pass
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait(timeout=30)
    with hold_output_dir(out, "--out"):
        pass


def test_the_lock_is_free_again_after_a_run(tmp_path):
    with hold_output_dir(tmp_path / "out", "--out"):
        pass
    with hold_output_dir(tmp_path / "out", "--out"):
        pass


def test_a_run_started_by_the_holder_shares_its_hold(tmp_path):
    # The table runner holds --out for the whole table and starts each run as its child with the same --out.
    with hold_output_dir(tmp_path / "out", "--out"):
        child = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "out")], input="", capture_output=True,
                               text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "held", child.stderr


def test_a_symlinked_lock_file_is_not_followed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "victim").write_text("keep")
    (tmp_path / "out" / LOCK_FILE).symlink_to(tmp_path / "victim")
    with pytest.raises(InputError, match="cannot create the lock file"):
        with hold_output_dir(tmp_path / "out", "--out"):
            pass
    assert (tmp_path / "victim").read_text() == "keep"


def _main_refusal(argv, capsys) -> str:
    from qwt.tasks.classification import main

    code = main("vit", "", ["--model", "deit_tiny", "--smoke", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_main_refuses_a_symlinked_save_before_the_run(tmp_path, capsys):
    # Before: --save pointing at a symlink to an earlier save failed after the whole run (record incomplete).
    (tmp_path / "earlier").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "earlier")
    err = _main_refusal(["--save", str(tmp_path / "link"), "--out", str(tmp_path / "out")], capsys)
    assert "is a symbolic link" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("save", ["{out}", "{tmp}"])
def test_main_refuses_a_save_folder_that_would_hold_the_records(tmp_path, capsys, save):
    out = tmp_path / "out"
    err = _main_refusal(["--save", save.format(out=out, tmp=tmp_path), "--out", str(out)], capsys)
    assert "pass a --save outside --out" in err or "files a save did not write" in err
    assert not out.exists()


def test_main_refuses_a_save_folder_with_foreign_files(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "qwt.json").write_text("{}")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    err = _main_refusal(["--save", str(tmp_path / "m"), "--out", str(tmp_path / "out")], capsys)
    assert "files a save did not write (notes.txt)" in err and (tmp_path / "m" / "notes.txt").exists()


def test_a_second_deploy_run_on_the_same_out_is_refused(held):
    # Before: deploy.py had no hold on --out; two runs wrote summary.json and table.md in turn, the last one winning.
    out, holder = held
    done = subprocess.run([sys.executable, "scripts/deploy.py", "--models", "vit_fmnist", "--out", str(out)],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"is in use by another run (pid {holder.pid}:" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing measured, nothing written
