"""Results on stdout, errors and warnings on stderr: `trainer check c.yaml > resolved.yaml` never
hides a failure inside the file."""

import logging

import pytest

from tests.conftest import tiny_config
from trainer.cli import main


def run(monkeypatch, capsys, *argv):
    monkeypatch.setattr("sys.argv", ["trainer", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_check_prints_the_config_on_stdout_and_an_error_on_stderr(tmp_path, folder_data, monkeypatch, capsys):
    good = tmp_path / "c.yaml"
    good.write_text(tiny_config(folder_data))
    code, out, err = run(monkeypatch, capsys, "check", str(good))
    assert code == 0 and out.startswith("name: tiny") and err == ""
    code, out, err = run(monkeypatch, capsys, "check", str(good), "--set", "data.bs=0")
    assert code == 2 and out == "" and "data.bs: Input should be greater than or equal to 1" in err


def test_the_no_cuda_runtime_note_of_torch_is_filtered():
    from trainer.run.runtime import _NoCudaRuntimeNote

    note = logging.LogRecord(
        "torch.utils.cpp_extension",
        logging.WARNING,
        "",
        0,
        "No CUDA runtime is found, using CUDA_HOME='%s'",
        ("/usr/local/cuda",),
        None,
    )
    other = logging.LogRecord("torch.utils.cpp_extension", logging.WARNING, "", 0, "something else", (), None)
    assert not _NoCudaRuntimeNote().filter(note) and _NoCudaRuntimeNote().filter(other)
