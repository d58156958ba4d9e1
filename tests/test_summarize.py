import json

import pytest

import summarize
from conftest import ROOT


def write_run(folder, norm, seed, test_acc, **recipe):
    metrics = {"norm": norm, "params": 49_290, "seed": seed, "epochs": 20, "lr": 0.2,
               "eval_split": "test", "test_acc": [0.5, test_acc], "train_eval_acc": test_acc + 0.03,
               "epoch_seconds": [40.0 + seed, 41.0], **recipe}
    (folder / norm).mkdir(parents=True)
    (folder / norm / "metrics.json").write_text(json.dumps(metrics))


def test_mean_and_range_over_seeds(tmp_path, capsys):
    for seed, acc in enumerate([0.80, 0.83, 0.86]):
        write_run(tmp_path / f"seed{seed}", "gn", seed, acc)
    write_run(tmp_path / "seed0", "bn", 0, 0.90)
    summarize.main([str(tmp_path / f"seed{seed}") for seed in range(3)])
    rows = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["| GN"] == "| GN | 49,290 | 0, 1, 2 | 83.00% | 80.00% / 86.00% | 86.00% |"
    assert rows["| BN"] == "| BN | 49,290 | 0 | 90.00% | 90.00% / 90.00% | 93.00% |"
    assert "| LN" not in rows


def test_refuses_runs_of_different_recipes(tmp_path, capsys):
    write_run(tmp_path / "a", "bn", 0, 0.80)
    write_run(tmp_path / "b", "bn", 1, 0.82, lr=0.4)
    with pytest.raises(SystemExit, match="bn runs with seeds \\[1\\] use another recipe"):
        summarize.main([str(tmp_path / "a"), str(tmp_path / "b")])


def test_runs_from_before_the_blocks_option_count_as_plain(tmp_path, capsys):
    write_run(tmp_path / "old", "gn", 0, 0.80)
    write_run(tmp_path / "plain", "gn", 1, 0.82, blocks="plain")
    write_run(tmp_path / "separable", "gn", 2, 0.84, blocks="separable")
    summarize.main([str(tmp_path / "old"), str(tmp_path / "plain")])
    assert "| GN | 49,290 | 0, 1 | 81.00% |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="use another recipe"):
        summarize.main([str(tmp_path / "old"), str(tmp_path / "separable")])


def write_list(folder, text):
    path = folder / "runs.txt"
    path.write_text(text)
    return str(path)


def ablation_rows(capsys, list_path):
    summarize.main(["--ablation", list_path])
    return capsys.readouterr().out.splitlines()[2:]


def test_ablation_names_each_change_against_the_baseline_the_list_gives(tmp_path, capsys):
    write_run(tmp_path / "base", "gn", 0, 0.77)
    write_run(tmp_path / "wd", "gn", 0, 0.76, weight_decay=5e-5)
    write_run(tmp_path / "bs128", "gn", 0, 0.79, batch_size=128)
    write_run(tmp_path / "bs128-lr", "gn", 0, 0.80, batch_size=128, lr=0.4)
    write_run(tmp_path / "seed1", "gn", 1, 0.775)
    runs = write_list(tmp_path, "# run baseline\nbase/gn\nwd/gn base/gn\n\n"
                                "bs128/gn base/gn  # batch size\nbs128-lr/gn wd/gn\nseed1/gn base/gn\n")
    assert ablation_rows(capsys, runs) == [
        "| base/gn |  | baseline | 77.00% |  | 80.00% |",
        "| wd/gn | base/gn | weight_decay None -> 5e-05 | 76.00% | -1.00 | 79.00% |",
        "| bs128/gn | base/gn | batch_size None -> 128 | 79.00% | +2.00 | 82.00% |",
        "| bs128-lr/gn | wd/gn | batch_size None -> 128, lr 0.2 -> 0.4, weight_decay 5e-05 -> None "
        "| 80.00% | +4.00 | 83.00% |",
        "| seed1/gn | base/gn | seed 0 -> 1 | 77.50% | +0.50 | 80.50% |"]


def test_ablation_reads_a_patch_option_missing_from_older_runs_as_its_default(tmp_path, capsys):
    write_run(tmp_path / "old", "bn", 0, 0.836)
    write_run(tmp_path / "default", "bn", 0, 0.836, ema=0.0, wd_all=1)
    write_run(tmp_path / "ema", "bn", 0, 0.79, ema=0.999)
    runs = write_list(tmp_path, "old/bn\ndefault/bn old/bn\nema/bn default/bn\n")
    assert ablation_rows(capsys, runs)[1:] == [
        "| default/bn | old/bn | none (a repeat) | 83.60% | +0.00 | 86.60% |",
        "| ema/bn | default/bn | ema 0.0 -> 0.999 | 79.00% | -4.60 | 82.00% |"]


def test_ablation_shows_the_note_of_a_change_the_metrics_do_not_record(tmp_path, capsys):
    write_run(tmp_path / "base", "bn", 0, 0.84)
    write_run(tmp_path / "se", "bn", 0, 0.83, params=49634)
    runs = write_list(tmp_path, "base/bn\nse/bn base/bn -- squeeze-excite in C8, C9  # patch\n")
    assert ablation_rows(capsys, runs)[1] == (
        "| se/bn | base/bn | squeeze-excite in C8, C9, params 49290 -> 49634 | 83.00% | -1.00 | 86.00% |")


@pytest.mark.parametrize("text", ["a b c\n", "b a\na\n", "a\nb nope\n", "a\n -- a note alone\n",
                                  "a -- a note without a baseline\n"])
def test_ablation_list_line_that_names_no_run_above_is_one_line_error(tmp_path, text):
    with pytest.raises(SystemExit, match=":[12]: expected 'RUN \\[BASELINE\\] \\[-- NOTE\\]'"):
        summarize.main(["--ablation", write_list(tmp_path, text)])


def test_missing_metrics_file_or_list_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no such metrics file: .*nope/metrics.json"):
        summarize.main(["--ablation", write_list(tmp_path, "nope\n")])
    with pytest.raises(SystemExit, match="no such run list: .*absent.txt"):
        summarize.main(["--ablation", str(tmp_path / "absent.txt")])


def test_seed_folders_and_ablation_list_exclude_each_other(tmp_path, capsys):
    for argv in ([], ["results", "--ablation", "runs.txt"], ["--times", "--update", "README.md"],
                 ["--ablation", "runs.txt", "--include", "a.txt"]):
        with pytest.raises(SystemExit) as exit_info:
            summarize.main(argv)
        assert exit_info.value.code == 2
        assert "give seed folders, or --ablation LIST" in capsys.readouterr().err


def test_times_gives_each_folders_machine_and_training_time(tmp_path, capsys):
    for norm, seconds in (("bn", [10.0, 20.0]), ("gn", [30.0, 30.0])):
        write_run(tmp_path / "run", norm, 0, 0.8, processor="Test CPU", torch="2.99", threads=2,
                  epoch_seconds=seconds)
    summarize.main(["--times", str(tmp_path / "run")])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == f"| `{tmp_path / 'run'}` | Test CPU | 2.99, 2 | 15.0 / 30.0 | 1.5 min (90 s) |"


def test_update_regenerates_the_tables_between_the_markers_only(tmp_path, capsys):
    write_run(tmp_path / "seed0", "gn", 0, 0.80)
    page = tmp_path / "page.md"
    page.write_text(f"intro 12.34%\n<!-- summarize.py {tmp_path / 'seed0'} -->\n| stale |\n"
                    "<!-- end -->\nafter\n")
    summarize.main(["--update", str(page)])
    text = page.read_text()
    assert "| stale |" not in text and "| GN | 49,290 | 0 | 80.00% |" in text
    assert text.startswith("intro 12.34%\n<!-- summarize.py ") and text.endswith("<!-- end -->\nafter\n")


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))])
def test_generated_tables_of_the_pages_match_the_committed_results(page):
    """A number in a generated table is never edited by hand: the page equals what
    `python summarize.py --update` makes of it from the committed runs."""
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    text = path.read_text()
    assert summarize.regenerate(text) == text
