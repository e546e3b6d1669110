"""Result files that survive interruption and reruns.

Each benchmark keeps, per device and day, a pair of files: ``<name>.jsonl`` and
``<name>.md``. The ``.jsonl`` is the source of truth (one JSON object a line: for the
attention and contrastive benchmarks an ``"record_type": "environment"`` line, then one
line per measurement); the ``.md`` report is derived from it and regenerated from it on
every write (``python bench/result_files.py FILE.jsonl`` regenerates it by hand).

:func:`write_merged_results` writes such a pair:

- a rerun on the same day merges into the existing file: a new measurement replaces the
  earlier one of the same identity (the same case and implementation, the key fields
  differ per benchmark), every other earlier measurement is kept, so a rerun of a subset
  (or an interrupted rerun) loses nothing;
- the ``.jsonl`` is written first, then the ``.md`` from the merged records, each with
  :func:`write_atomically`: a run killed part-way (a device call's time limit, Ctrl-C)
  leaves complete files holding every measurement finished so far, never a half-written
  one, and a ``.md`` left behind by an interruption between the two writes is rebuilt by
  the next write (or by hand, see above).

:func:`stop_on_interrupt` lets a benchmark's loop end on Ctrl-C (SIGINT) so that the
script can still print the summary of what finished and exit with
:data:`INTERRUPTED_EXIT_STATUS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

INTERRUPTED_EXIT_STATUS = 130
"""Exit status of a benchmark stopped by Ctrl-C (SIGINT), as a shell reports 128 + 2."""

ENVIRONMENT_RECORD_TYPE = "environment"
MEASUREMENT_RECORD_TYPE = "measurement"


def write_atomically(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) in one step: write a temporary file beside it,
    flush it to disk, then rename it over ``path``. Readers see the old or the new
    content, never a mix; an interruption (Ctrl-C, an error) leaves the old file and no
    temporary file. Returns ``path`` as a Path."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()  # only still there when the rename did not happen
    return path


@dataclasses.dataclass
class ResultFile:
    """The content of a ``.jsonl`` result file."""

    environment: dict[str, Any] | None = None
    """The environment line (without its ``record_type``), if the file has one."""
    measurements: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Every other JSON object of the file, in order (with their ``record_type``, if any)."""
    unreadable_lines: list[str] = dataclasses.field(default_factory=list)
    """Lines that are not JSON objects: kept unchanged, at the end, by a merge."""


def read_result_file(path: str | Path) -> ResultFile:
    """Read a ``.jsonl`` result file; an empty :class:`ResultFile` if there is none."""
    content = ResultFile()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return content
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            content.unreadable_lines.append(line)
        elif row.get("record_type") == ENVIRONMENT_RECORD_TYPE:
            content.environment = {key: value for key, value in row.items()
                                   if key != "record_type"}
        else:
            content.measurements.append(row)
    return content


def record_identity(row: dict[str, Any], identity_fields: Sequence[str]) -> tuple[Hashable, ...]:
    """The values of ``identity_fields`` in ``row`` (None for a missing field)."""
    return tuple(json.dumps(row.get(field), sort_keys=True) for field in identity_fields)


def merge_measurements(
    earlier: Sequence[dict[str, Any]],
    new: Sequence[dict[str, Any]],
    identity_fields: Sequence[str],
) -> list[dict[str, Any]]:
    """``earlier`` with each row replaced by the new row of the same identity (the values
    of ``identity_fields``), in place, followed by the new rows of identities ``earlier``
    does not have. Earlier rows no new row replaces are kept; of several new rows of one
    identity the last wins."""
    new_by_identity = {record_identity(row, identity_fields): row for row in new}
    merged, placed = [], set()
    for row in earlier:
        identity = record_identity(row, identity_fields)
        if identity in placed:
            continue  # a duplicate of an identity already written
        merged.append(new_by_identity.get(identity, row))
        placed.add(identity)
    for identity, row in new_by_identity.items():
        if identity not in placed:
            merged.append(row)
            placed.add(identity)
    return merged


VERSION_FIELDS = ("device", "torch", "triton", "cuda", "transformers", "blipfast")
"""The environment fields that say what a measurement was taken with (the rest: the date,
which the file name holds, and rates measured on the way)."""

MEASURED_WITH = "measured_with"
"""The field of a measurement kept from an earlier run whose versions differ from the
file's environment line (the newest run's): that run's :data:`VERSION_FIELDS`."""


UNKNOWN_ENVIRONMENT = {"device": "unknown (the .jsonl has no environment line)",
                       "torch": "unknown", "triton": "unknown", "cuda": "unknown",
                       "date": "unknown"}
"""The environment a report shows for a ``.jsonl`` without an environment line (rather
than the regenerating machine's)."""


UNKNOWN_VERSIONS = {"versions": "unknown (the file had no environment line)"}


def _versions(environment: dict[str, Any] | None) -> dict[str, Any]:
    return {name: environment[name] for name in VERSION_FIELDS
            if environment and name in environment}


@functools.cache
def blipfast_revision() -> str:
    """blipfast's version and, in a git checkout, its commit ("+ changes" when tracked
    files differ from it): what a result was measured with. Read once per process (two
    git calls; a run's environment is collected several times)."""
    import subprocess

    import blipfast

    revision = f"blipfast {blipfast.__version__}"
    repository = Path(blipfast.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repository,
                                capture_output=True, text=True, timeout=10)
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=repository, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return revision
    if commit.returncode != 0:
        return revision
    return (f"{revision} (commit {commit.stdout.strip()}"
            f"{' + changes' if changes.stdout.strip() else ''})")


def write_merged_jsonl(
    jsonl_path: str | Path,
    measurements: Sequence[dict[str, Any]],
    identity_fields: Sequence[str],
    environment: dict[str, Any] | None = None,
) -> ResultFile:
    """Merge ``measurements`` (JSON rows) into the ``.jsonl`` at ``jsonl_path``
    (:func:`merge_measurements`) and write it. ``environment``, when given, becomes the
    file's environment line (the newest run's); otherwise the file's own is kept. Earlier
    rows kept under a new environment line of other versions get their own versions
    (:data:`MEASURED_WITH`), so that none is labelled with versions it did not run with.
    Returns the merged content."""
    existing = read_result_file(jsonl_path)
    earlier = existing.measurements
    if environment is not None:
        new_versions = _versions(environment)
        old_versions = (_versions(existing.environment) if existing.environment is not None
                        else UNKNOWN_VERSIONS)

        def labelled(row: dict[str, Any]) -> dict[str, Any]:
            # a row's own versions (those of the file's environment line if it has none),
            # kept as its label unless they are the new run's
            versions = row.get(MEASURED_WITH, old_versions)
            rest = {key: value for key, value in row.items() if key != MEASURED_WITH}
            return rest if versions == new_versions else {**rest, MEASURED_WITH: versions}

        earlier = [labelled(row) for row in earlier]
    merged = ResultFile(
        environment=environment if environment is not None else existing.environment,
        measurements=merge_measurements(earlier, measurements, identity_fields),
        unreadable_lines=existing.unreadable_lines,
    )
    lines = []
    if merged.environment is not None:
        lines.append(json.dumps({"record_type": ENVIRONMENT_RECORD_TYPE, **merged.environment}))
    lines += [json.dumps(row) for row in merged.measurements]
    lines += merged.unreadable_lines
    write_atomically(jsonl_path, "".join(line + "\n" for line in lines))
    return merged


def other_versions_note(content: ResultFile) -> str:
    """A markdown paragraph listing the rows measured with other versions than the
    environment line's (:data:`MEASURED_WITH`); empty when there are none."""
    others: dict[str, int] = {}
    for row in content.measurements:
        if MEASURED_WITH in row:
            key = ", ".join(f"{name} {value}" for name, value in row[MEASURED_WITH].items())
            others[key] = others.get(key, 0) + 1
    if not others:
        return ""
    return ("\n\nRows measured with other versions than the header's (each row's "
            f"`{MEASURED_WITH}` in the .jsonl): "
            + "; ".join(f"{count} with {key}" for key, count in others.items()) + ".\n")


def write_merged_results(
    jsonl_path: str | Path,
    markdown_path: str | Path,
    measurements: Sequence[dict[str, Any]],
    identity_fields: Sequence[str],
    format_markdown: Callable[[ResultFile], str],
    environment: dict[str, Any] | None = None,
) -> ResultFile:
    """:func:`write_merged_jsonl`, then regenerate ``markdown_path`` from the merged file
    with ``format_markdown`` (and :func:`other_versions_note`). Returns the merged
    content."""
    merged = write_merged_jsonl(jsonl_path, measurements, identity_fields, environment)
    write_atomically(markdown_path, _report(merged, format_markdown))
    return merged


def _report(content: ResultFile, format_markdown: Callable[[ResultFile], str]) -> str:
    """The ``.md`` of a result file's content: ``format_markdown``'s report, then
    :func:`other_versions_note`."""
    return format_markdown(content).rstrip("\n") + "\n" + other_versions_note(content)


def write_day_results(
    output_directory: str | Path,
    stem: str,
    measurements: Sequence[dict[str, Any]],
    identity_fields: Sequence[str],
    format_markdown: Callable[[ResultFile], str],
    environment: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """:func:`write_merged_results` into ``<output_directory>/<stem>.jsonl`` and ``.md``
    (the directory made if needed); returns (markdown path, jsonl path)."""
    directory = Path(output_directory)
    directory.mkdir(parents=True, exist_ok=True)
    markdown_path, jsonl_path = directory / f"{stem}.md", directory / f"{stem}.jsonl"
    write_merged_results(jsonl_path, markdown_path, measurements, identity_fields,
                         format_markdown, environment)
    return markdown_path, jsonl_path


def dataclass_from_row(cls: type, row: dict[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` from a JSON row: fields ``cls`` does not have
    (``record_type``, derived values such as TFLOP/s) are left out; None if the row lacks a
    required field or does not fit."""
    names = {field.name for field in dataclasses.fields(cls)}
    try:
        return cls(**{key: value for key, value in row.items() if key in names})
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class Interruption:
    """Whether a :func:`stop_on_interrupt` block ended on Ctrl-C."""

    interrupted: bool = False


@contextlib.contextmanager
def stop_on_interrupt(what: str = "measuring") -> Iterator[Interruption]:
    """Within it, Ctrl-C (KeyboardInterrupt) ends the block instead of the program: a line
    says so on stderr and the yielded :class:`Interruption` records it, so that the caller
    can still print what finished, write its results and exit with
    :data:`INTERRUPTED_EXIT_STATUS`."""
    interruption = Interruption()
    try:
        yield interruption
    except KeyboardInterrupt:
        interruption.interrupted = True
        print(f"\nInterrupted (Ctrl-C): stopped {what}; the results below are partial.",
              file=sys.stderr, flush=True)


def regenerate_markdown(jsonl_path: str | Path) -> Path:
    """Rewrite the ``.md`` beside a benchmark's ``.jsonl`` (``attention-*``,
    ``contrastive-*`` or ``models-*``) from the ``.jsonl`` alone. Returns the ``.md``'s
    path."""
    jsonl_path = Path(jsonl_path)
    bench_directory = str(Path(__file__).resolve().parent)
    if bench_directory not in sys.path:
        sys.path.insert(0, bench_directory)
    prefix = jsonl_path.name.split("-", 1)[0]
    if prefix == "attention":
        import attention_benchmark_cases as module
    elif prefix == "contrastive":
        import contrastive_benchmark_cases as module
    elif prefix == "models":
        import run_models as module
    else:
        raise ValueError(f"{jsonl_path.name}: not an attention-, contrastive- or models- "
                         "result file")
    markdown_path = jsonl_path.with_suffix(".md")
    content = read_result_file(jsonl_path)
    if content.unreadable_lines:
        print(f"{jsonl_path}: {len(content.unreadable_lines)} lines are not JSON objects "
              "(left out of the report)", file=sys.stderr)
    if content.environment is None and prefix != "models":  # models' rows carry their own
        print(f"{jsonl_path}: no environment line: the report says the device and versions "
              "are unknown", file=sys.stderr)
    write_atomically(markdown_path, _report(content, module.format_result_file))
    return markdown_path


def main(arguments: Sequence[str] | None = None) -> int:
    """Regenerate the ``.md`` of each ``.jsonl`` named on the command line."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Regenerate a benchmark's .md report from its .jsonl, the source of truth "
                    "(attention-*, contrastive-* or models-* files under bench/results).")
    parser.add_argument("jsonl", nargs="+", type=Path, help="result files (.jsonl)")
    options = parser.parse_args(arguments)
    for jsonl_path in options.jsonl:
        if jsonl_path.suffix != ".jsonl" or not jsonl_path.is_file():
            parser.error(f"{jsonl_path}: not an existing .jsonl file")
        try:
            print(f"wrote {regenerate_markdown(jsonl_path)}")
        except ValueError as error:
            parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
