"""The benchmarks' result files (bench/result_files.py and the runners' ``write_results``):
a rerun on the same day merges into the day's file instead of replacing it, the
``.jsonl`` is written first and the ``.md`` regenerated from it, and an interrupted write
leaves the old file and no temporary one (CPU; no timing)."""

import builtins
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "bench"))

import attention_benchmark_cases as attention  # noqa: E402
import contrastive_benchmark_cases as contrastive  # noqa: E402
import result_files  # noqa: E402
import run_models  # noqa: E402

ENVIRONMENT = dict(device="Test GPU", torch="-", triton="-", cuda="-", date="2026-01-02")


def _attention_record(case: str, mode: str, implementation: str, milliseconds: float):
    return attention.MeasurementRecord.create(implementation, attention.CASES_BY_NAME[case],
                                              mode, "ok", milliseconds=milliseconds)


def _contrastive_record(case: str, implementation: str, milliseconds: float):
    return contrastive.MeasurementRecord.create(
        implementation, contrastive.CASES_BY_NAME[case], "ok", milliseconds=milliseconds,
        timer="do_bench")


def _measurements(jsonl_path: Path) -> list[dict]:
    rows = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert rows[0]["record_type"] == "environment"
    return rows[1:]


def test_attention_rerun_replaces_the_same_identity_and_keeps_the_others(tmp_path):
    full_run = [_attention_record(case, mode, implementation, 1.0)
                for case in ("text_bidir_pad", "vit_g_self") for mode in attention.MODES
                for implementation in ("blipfast", "sdpa_math")]
    attention.write_results(full_run, tmp_path, ENVIRONMENT)
    # A rerun of one case and implementation (--case vit_g_self --implementation blipfast)
    rerun = [_attention_record("vit_g_self", mode, "blipfast", 2.0) for mode in attention.MODES]
    markdown_path, jsonl_path = attention.write_results(rerun, tmp_path, ENVIRONMENT)

    rows = _measurements(jsonl_path)
    assert len(rows) == len(full_run)
    times = {(row["case"], row["mode"], row["implementation"]): row["milliseconds"]
             for row in rows}
    assert times[("vit_g_self", "fwd", "blipfast")] == times[("vit_g_self", "fwd_bwd",
                                                              "blipfast")] == 2.0
    assert sum(value == 1.0 for value in times.values()) == len(full_run) - 2
    # The .md is regenerated from the merged records: every row, the new times included.
    markdown = markdown_path.read_text()
    assert markdown.count("| text_bidir_pad (") == 2 and markdown.count("| vit_g_self (") == 2
    assert "| 2.0000 |" in markdown and "| 1.0000 |" in markdown
    # Writing the same records again changes nothing (runners rewrite after every record).
    before = jsonl_path.read_text()
    attention.write_results(rerun, tmp_path, ENVIRONMENT)
    assert jsonl_path.read_text() == before


def test_contrastive_rerun_merges_and_the_markdown_is_derived_from_the_jsonl(tmp_path):
    first = [_contrastive_record("itc_n4096", implementation, 1.0)
             for implementation in contrastive.IMPLEMENTATION_NAMES]
    contrastive.write_results(first, tmp_path, ENVIRONMENT)
    rerun = [_contrastive_record("itc_n4096", "blipfast", 0.5)]
    markdown_path, jsonl_path = contrastive.write_results(rerun, tmp_path, ENVIRONMENT)

    rows = _measurements(jsonl_path)
    assert [(row["implementation"], row["milliseconds"]) for row in rows] == [
        (name, 0.5 if name == "blipfast" else 1.0) for name in contrastive.IMPLEMENTATION_NAMES]
    # The derived TFLOP/s of the .jsonl is recomputed, not read back as a field.
    assert rows[0]["teraflops_per_second"] == pytest.approx(
        contrastive.CASES_BY_NAME["itc_n4096"].floating_point_operations() / 0.5e-3 / 1e12)
    expected = markdown_path.read_text()
    assert "| 0.500 |" in expected and "| 2.00x |" in expected  # speedup vs materialized
    markdown_path.unlink()
    assert result_files.regenerate_markdown(jsonl_path) == markdown_path
    assert markdown_path.read_text() == expected


def test_a_different_day_or_device_is_another_file(tmp_path):
    record = [_contrastive_record("itc_n4096", "blipfast", 1.0)]
    contrastive.write_results(record, tmp_path, ENVIRONMENT)
    contrastive.write_results(record, tmp_path, dict(ENVIRONMENT, date="2026-01-03"))
    contrastive.write_results(record, tmp_path, dict(ENVIRONMENT, device="Other GPU"))
    assert len(list(tmp_path.glob("*.jsonl"))) == 3


def test_models_rerun_merges_by_step_implementation_batch_and_length(tmp_path):
    def record(step, implementation, batch, milliseconds):
        return dict(step=step, implementation=implementation, batch=batch, length=35,
                    flops=1e12, matmul_rate=1e15, model="BLIP-base", precision="bf16 autocast",
                    environment="Test GPU", ms=milliseconds, peak_gib=1.0, loss=2.0,
                    warmup_seconds=0.1, mfu=0.1)

    def write(records):
        return result_files.write_merged_results(
            tmp_path / "models.jsonl", tmp_path / "models.md", records,
            run_models.MEASUREMENT_IDENTITY, run_models.format_result_file)

    write([record(step, name, 64, 10.0) for step in ("captioning", "itm")
           for name in (run_models.EAGER, "blipfast model")])
    merged = write([record("itm", "blipfast model", 64, 5.0),
                    record("itm", "blipfast model", 32, 3.0)])
    assert [(row["step"], row["implementation"], row["batch"], row["ms"])
            for row in merged.measurements] == [
        ("captioning", run_models.EAGER, 64, 10.0), ("captioning", "blipfast model", 64, 10.0),
        ("itm", run_models.EAGER, 64, 10.0), ("itm", "blipfast model", 64, 5.0),
        ("itm", "blipfast model", 32, 3.0)]
    markdown = (tmp_path / "models.md").read_text()
    assert "| itm | 64 x 35 | blipfast model | 5.0 | 1.0 | 2.00x | 10% | 2.0000 |" in markdown
    assert "| itm | 32 x 35 | blipfast model | 3.0 | 1.0 | (eager not yet run) |" in markdown
    # The models .jsonl stays one measurement a line (no environment line).
    assert all("step" in json.loads(line)
               for line in (tmp_path / "models.jsonl").read_text().splitlines())


def test_unreadable_lines_are_kept(tmp_path):
    jsonl_path = tmp_path / "attention-test-gpu-2026-01-02.jsonl"
    jsonl_path.write_text('{"record_type": "environment", "device": "x"}\nnot json\n')
    result_files.write_merged_results(jsonl_path, tmp_path / "x.md", [{"case": "a"}],
                                      ("case",), lambda content: "report\n")
    assert jsonl_path.read_text().splitlines() == [
        '{"record_type": "environment", "device": "x"}', '{"case": "a"}', "not json"]


def test_merge_replaces_in_place_and_appends_new_identities():
    earlier = [dict(name="a", value=1), dict(name="b", value=1), dict(name="c", value=1)]
    new = [dict(name="d", value=2), dict(name="b", value=2)]
    assert result_files.merge_measurements(earlier, new, ("name",)) == [
        dict(name="a", value=1), dict(name="b", value=2), dict(name="c", value=1),
        dict(name="d", value=2)]


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "results.jsonl"
    result_files.write_atomically(target, "old complete\n")
    real_open = builtins.open

    class InterruptedHandle:
        """Writes a few characters, then Ctrl-C arrives."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[:3])
            raise KeyboardInterrupt

    def interrupting_open(path, *arguments, **keywords):
        handle = real_open(path, *arguments, **keywords)
        return InterruptedHandle(handle) if str(path).endswith(".partial") else handle

    monkeypatch.setattr(builtins, "open", interrupting_open)
    with pytest.raises(KeyboardInterrupt):
        result_files.write_atomically(target, "new complete\n")
    monkeypatch.setattr(builtins, "open", real_open)
    assert target.read_text() == "old complete\n"
    assert [path.name for path in tmp_path.iterdir()] == ["results.jsonl"]


def test_an_interruption_between_the_two_files_leaves_a_complete_jsonl(tmp_path, monkeypatch):
    """The .jsonl (the source of truth) is written first; a .md left behind by an
    interruption before its own write is brought up to date by the next write."""
    first = [_contrastive_record("itc_n4096", "blipfast", 1.0)]
    markdown_path, jsonl_path = contrastive.write_results(first, tmp_path, ENVIRONMENT)
    real_write = result_files.write_atomically
    written = []

    def interrupted_before_the_markdown(path, text):
        if Path(path).suffix == ".md":
            raise KeyboardInterrupt
        written.append(Path(path).suffix)
        return real_write(path, text)

    monkeypatch.setattr(result_files, "write_atomically", interrupted_before_the_markdown)
    second = first + [_contrastive_record("itc_n4096", "materialized", 2.0)]
    with pytest.raises(KeyboardInterrupt):
        contrastive.write_results(second, tmp_path, ENVIRONMENT)
    monkeypatch.setattr(result_files, "write_atomically", real_write)
    assert written == [".jsonl"]
    assert len(_measurements(jsonl_path)) == 2
    assert "| materialized |" not in markdown_path.read_text()  # not yet regenerated
    contrastive.write_results(second, tmp_path, ENVIRONMENT)
    assert "| materialized |" in markdown_path.read_text()


def test_regenerate_from_the_command_line(tmp_path):
    markdown_path, jsonl_path = attention.write_results(
        [_attention_record("text_bidir_pad", "fwd", "blipfast", 1.0)], tmp_path, ENVIRONMENT)
    expected = markdown_path.read_text()
    markdown_path.write_text("stale\n")
    result = subprocess.run([sys.executable, str(REPOSITORY / "bench" / "result_files.py"),
                             str(jsonl_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert markdown_path.read_text() == expected
    result = subprocess.run([sys.executable, str(REPOSITORY / "bench" / "result_files.py"),
                             str(tmp_path / "missing.jsonl")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "not an existing .jsonl file" in result.stderr


def test_rows_kept_from_a_run_with_other_versions_keep_those_versions(tmp_path):
    """A same-day rerun under other versions rewrites the environment line: the earlier
    rows it keeps carry their own versions (in the .jsonl, and a note in the .md), instead
    of being labelled with the new run's."""
    attention.write_results([_attention_record("text_bidir_pad", "fwd", "blipfast", 1.0),
                             _attention_record("text_bidir_pad", "fwd", "sdpa_math", 3.0)],
                            tmp_path, dict(ENVIRONMENT, torch="2.11"))
    newer = dict(ENVIRONMENT, torch="2.13")
    markdown_path, jsonl_path = attention.write_results(
        [_attention_record("text_bidir_pad", "fwd", "blipfast", 2.0)], tmp_path, newer)
    content = result_files.read_result_file(jsonl_path)
    assert content.environment["torch"] == "2.13"
    by_implementation = {row["implementation"]: row for row in content.measurements}
    assert "measured_with" not in by_implementation["blipfast"]  # the new run's
    assert by_implementation["sdpa_math"]["measured_with"]["torch"] == "2.11"
    assert "1 with device Test GPU, torch 2.11" in markdown_path.read_text()
    # the same versions again: nothing more is stamped
    attention.write_results([_attention_record("text_bidir_pad", "fwd", "blipfast", 2.0)],
                            tmp_path, newer)
    assert result_files.read_result_file(jsonl_path).measurements == content.measurements


def test_a_report_of_a_jsonl_without_environment_does_not_claim_this_machine(tmp_path):
    jsonl_path = tmp_path / "attention-x-2026-01-02.jsonl"
    row = _attention_record("text_bidir_pad", "fwd", "blipfast", 1.0)
    jsonl_path.write_text(json.dumps(row.to_dict()) + "\nnot json\n")
    result = subprocess.run([sys.executable, str(REPOSITORY / "bench" / "result_files.py"),
                             str(jsonl_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "no environment line" in result.stderr and "1 lines are not JSON" in result.stderr
    markdown = jsonl_path.with_suffix(".md").read_text()
    assert "device: unknown (the .jsonl has no environment line)" in markdown
    assert "device: cpu" not in markdown and "date unknown" in markdown


def test_a_benchmark_in_a_pytest_xdist_worker_is_skipped():
    """Workers' records never reached the results files (only the controller wrote, and
    it had none), and processes timing at once on one GPU disturb each other."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("bench_conftest",
                                                  REPOSITORY / "bench" / "conftest.py")
    bench_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_conftest)
    worker = types.SimpleNamespace(config=types.SimpleNamespace(workerinput={}))
    with pytest.raises(pytest.skip.Exception, match="without -n"):
        bench_conftest._recorder(worker, bench_conftest.ATTENTION_RECORDS_KEY, attention)


def test_rows_of_a_file_without_environment_are_not_given_the_new_runs_versions(tmp_path):
    """An older file (the sweep's had no environment line) merged under a new run: its
    rows say their versions are unknown; rows later measured again with the header's
    versions carry no label (versions A, then B, then A again)."""
    jsonl_path = tmp_path / "attention-test-gpu-2026-01-02.jsonl"
    old_row = _attention_record("text_bidir_pad", "fwd", "sdpa_math", 3.0).to_dict()
    jsonl_path.write_text(json.dumps(old_row) + "\n")
    attention.write_results([_attention_record("text_bidir_pad", "fwd", "blipfast", 1.0)],
                            tmp_path, ENVIRONMENT)
    rows = {row["implementation"]: row
            for row in result_files.read_result_file(jsonl_path).measurements}
    assert rows["sdpa_math"]["measured_with"] == result_files.UNKNOWN_VERSIONS
    # versions B, then A again: the A row kept through B needs no label under A
    first = dict(ENVIRONMENT, torch="A")
    directory = tmp_path / "again"
    attention.write_results([_attention_record("text_bidir_pad", "fwd", "sdpa_math", 3.0)],
                            directory, first)
    attention.write_results([_attention_record("text_bidir_pad", "fwd", "blipfast", 1.0)],
                            directory, dict(ENVIRONMENT, torch="B"))
    markdown_path, jsonl_path = attention.write_results(
        [_attention_record("text_bidir_pad", "fwd", "blipfast", 2.0)], directory, first)
    rows = result_files.read_result_file(jsonl_path).measurements
    assert all("measured_with" not in row for row in rows)
    assert "other versions" not in markdown_path.read_text()
