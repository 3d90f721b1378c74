"""`valora dataset synth` through the root CLI: files on success, one clear line on bad input."""

from __future__ import annotations

from pipeline.cli import main


def test_dataset_synth_writes_the_clip_and_sidecar(tmp_path, capsys):
    assert main(["dataset", "synth", "--out", str(tmp_path), "--seconds", "1.5", "--seed", "4", "--size", "96x64"]) == 0
    assert (tmp_path / "traffic-4.mp4").stat().st_size > 0
    assert len((tmp_path / "traffic-4.jsonl").read_text().splitlines()) == 15
    assert "traffic-4.mp4" in capsys.readouterr().out


def test_dataset_synth_bad_arguments_give_one_line(tmp_path, capsys):
    assert main(["dataset", "synth", "--out", str(tmp_path / "x"), "--seconds", "1", "--size", "95"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "size" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x").exists()
