"""A human audit of a run's verdicts: a blind, stratified sample to label in a spreadsheet, read
back as the verdict table of judge `human`.

    rotserve judge audit RUN_DIR --sample 60 --seed 0 --out audit.csv
    # a person fills the `label` column (any spreadsheet or editor), then:
    rotserve judge audit-import RUN_DIR audit.csv       # -> RUN_DIR/verdicts/human.<rubric>/

The sample is stratified by angle region (rotserve.report.verdicts.region_of: the baseline and
the quarters of the circle around 0°, 90°, 180° and 270°) times the label one judge table gave
(`--by`, default the first model judge's table): strata take turns, one row each in a seeded
order, until N rows, so rare labels and regions are seen as often as common ones. It is not a
uniform sample of the run: agreement measured on it is agreement on the sample (every stratum
weighs alike), which is what an audit of a judge's labels needs.

The file is blind: it shows the instruction, the generation, a blank `label` column and the
labels the rubric allows, but no judge's label, no angle, no dataset, in a seeded shuffled
order. Every row also carries `row_key`, `run_id` and `sample` (a checksum of the sampled keys
in item order): a spreadsheet keeps columns through a round trip, not comment lines. The sample
itself is recorded in RUN_DIR/audits/<sample>.json, so the import checks the file line by line
against it: a file of another run, a missing, extra, repeated or relabelled row (its row_key
changed or moved), a blank label or one outside the rubric is refused with the line named.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotserve.fanout import now, provenance
from rotserve.judge.keyword import NAME as KEYWORD_TABLE
from rotserve.judge.keyword import complete_rows
from rotserve.judge.rubrics import BEHAVIOUR, BUILTIN, RubricError, load_rubric
from rotserve.judge.store import engine_free_table, publish_table
from rotserve.rundir import (
    TMP_DIR,
    VERDICT_FORMAT,
    VERDICT_SCHEMA,
    RunDirError,
    atomic_write,
    read_verdict_manifest,
    read_verdicts,
    verdict_tables,
)

AUDIT_FORMAT = "rotserve-audit/1"
AUDITS_DIR = "audits"
HUMAN = "human"
COLUMNS = (
    "item",
    "instruction",
    "generation",
    "label",
    "allowed labels",
    "note",  # free text for the person; ignored on import
    "row_key",
    "run_id",
    "sample",
)
MAX_PROBLEMS = 20  # problems listed in one error


class AuditError(ValueError):
    """An audit request or file that cannot be used; the message names the line and the fix."""


@dataclass(frozen=True)
class AuditRubric:
    """What a person labels with: the rubric's name, labels, axis and description."""

    name: str
    labels: tuple[str, ...]
    axis: dict[str, str]
    description: str
    fingerprint: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": list(self.labels),
            "axis": self.axis,
            "description": self.description,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class AuditSample:
    path: Path  # the CSV to label
    record: Path  # RUN_DIR/audits/<sample>.json
    sample: str
    items: int
    by: str | None
    rubric: AuditRubric
    strata: dict[str, int]  # "region | label" -> rows picked


@dataclass(frozen=True)
class AuditImport:
    name: str
    table_dir: Path
    manifest_path: Path
    state: str
    label_counts: dict[str, int]


def audits_dir(run_dir: Path) -> Path:
    return run_dir / AUDITS_DIR


def default_by(tables: list[str]) -> str | None:
    """The table a sample is stratified by: the first model judge's, else the keyword table's."""
    judges = [t for t in tables if not t.startswith(f"{HUMAN}.") and t != KEYWORD_TABLE]
    if judges:
        return judges[0]
    return KEYWORD_TABLE if KEYWORD_TABLE in tables else None


def audit_rubric(spec: str | None, by_manifest: dict[str, Any] | None) -> AuditRubric:
    """--rubric (a built-in or a rubric file), else the stratifying table's built-in rubric,
    else `behaviour`."""
    if spec is None:
        name = ((by_manifest or {}).get("rubric") or {}).get("name")
        spec = name if name in BUILTIN else BEHAVIOUR.name
    try:
        r = load_rubric(spec)
    except RubricError as e:
        raise AuditError(f"--rubric {spec}: {e}") from None
    return AuditRubric(r.name, r.labels, r.axis_map, r.description, r.fingerprint())


def write_audit(
    run_dir: str | Path,
    n: int,
    out: str | Path,
    *,
    seed: int = 0,
    by: str | None = None,
    rubric: str | None = None,
) -> AuditSample:
    """Draw the stratified sample, write the blind CSV to `out` and its record to
    RUN_DIR/audits/<sample>.json."""
    from rotserve.report.verdicts import region_of

    if n < 1:
        raise AuditError(f"--sample must be at least 1, got {n}")
    run_dir = Path(run_dir).expanduser().resolve()
    manifest, rows = complete_rows(run_dir)
    run_id = str(manifest["run_id"])
    tables = verdict_tables(run_dir)
    by = by if by is not None else default_by(tables)
    by_labels: dict[str, str] = {}
    by_manifest = None
    if by is not None:
        if by not in tables:
            raise AuditError(
                f"--by {by}: no such verdict table in {run_dir} (tables: "
                f"{', '.join(tables) or 'none'})"
            )
        v = read_verdicts(run_dir, by, rows=rows)
        by_labels = dict(
            zip(v.column("row_key").to_pylist(), v.column("label").to_pylist(), strict=True)
        )
        by_manifest = read_verdict_manifest(run_dir, by)
    ar = audit_rubric(rubric, by_manifest)
    keys = rows.column("row_key").to_pylist()
    text = dict(
        zip(
            keys,
            zip(
                rows.column("instruction").to_pylist(),
                rows.column("generation").to_pylist(),
                strict=True,
            ),
            strict=True,
        )
    )
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key, angle in zip(keys, rows.column("angle").to_pylist(), strict=True):
        label = by_labels.get(key, "unjudged") if by is not None else "-"
        strata[(region_of(angle), label)].append(key)
    rng = random.Random(f"rotserve-audit-{run_id}-{seed}")
    order = sorted(strata)
    for s in order:
        strata[s].sort()
        rng.shuffle(strata[s])
    picked: list[tuple[tuple[str, str], str]] = []
    while len(picked) < n and any(strata[s] for s in order):
        turn = [s for s in order if strata[s]]
        rng.shuffle(turn)  # which strata get the last, incomplete round is seeded too
        for s in turn[: n - len(picked)]:
            picked.append((s, strata[s].pop()))
    rng.shuffle(picked)  # the file's order says nothing about region or label
    sample = sample_id(run_id, ar, [k for _, k in picked])
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    allowed = " | ".join(ar.labels)
    with open(out, "w", newline="", encoding="utf-8-sig") as f:  # the BOM: Excel reads UTF-8
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i, (_, key) in enumerate(picked, 1):
            instruction, generation = text[key]
            w.writerow([i, instruction, generation, "", allowed, "", key, run_id, sample])
    counts: dict[str, int] = defaultdict(int)
    for (region, label), _ in picked:
        counts[f"{region} | {label}"] += 1
    record = {
        "format": AUDIT_FORMAT,
        "run_id": run_id,
        "sample": sample,
        "created": now(),
        "file": str(out.resolve()),
        "seed": seed,
        "requested": n,
        "by": by,
        "rubric": ar.as_dict(),
        "strata": dict(sorted(counts.items())),
        "rule": "strata = angle region (baseline, around 0/90/180/270°) x the label of table "
        "`by`; strata take turns, one row each in a seeded order, until the sample is full",
        "items": [
            {"item": i, "row_key": key, "region": s[0], "stratum_label": s[1]}
            for i, (s, key) in enumerate(picked, 1)
        ],
    }
    path = audits_dir(run_dir) / f"{sample}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / TMP_DIR).mkdir(exist_ok=True)
    blob = (json.dumps(record, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(blob), run_dir / TMP_DIR)
    return AuditSample(out, path, sample, len(picked), by, ar, dict(counts))


def sample_id(run_id: str, rubric: AuditRubric, keys: list[str]) -> str:
    """The checksum of a sample: its run, rubric labels and keys in item order."""
    blob = json.dumps([run_id, rubric.name, list(rubric.labels), keys], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_audit_file(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line where the record starts, record) of every non-blank record of an audit CSV."""
    if not path.is_file():
        raise AuditError(f"audit file {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            return _records(path, csv.reader(f))
        except UnicodeDecodeError as e:
            raise AuditError(
                f"audit file {path}: not UTF-8 text ({e}); save it as CSV UTF-8 from the "
                "spreadsheet"
            ) from None


def _records(path: Path, reader: Any) -> list[tuple[int, dict[str, str]]]:
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise AuditError(f"audit file {path}: empty") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise AuditError(
            f"{path} line 1: the header lacks column(s) {missing}; an audit file has "
            f"{', '.join(COLUMNS)} (write one with `rotserve judge audit`)"
        )
    out = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise AuditError(f"{path} line {start}: not valid CSV ({e})") from None
        if not any(c.strip() for c in cells):
            continue  # blank lines a spreadsheet leaves at the end
        out.append((start, {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)}))
    return out


def import_audit(
    run_dir: str | Path,
    file: str | Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> AuditImport:
    """Read a labelled audit file back as the verdict table human.<rubric> of the run."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = Path(file).expanduser()
    manifest, rows = complete_rows(run_dir)
    run_id = str(manifest["run_id"])
    records = read_audit_file(path)
    if not records:
        raise AuditError(f"audit file {path}: no rows under the header")
    line, first = records[0]
    if first["run_id"].strip() != run_id:
        raise AuditError(
            f"{path} line {line}: this file was written for run {first['run_id'].strip()!r}, "
            f"not for {run_dir} (run {run_id}): import it into the run it was sampled from"
        )
    sample = first["sample"].strip()
    record_path = audits_dir(run_dir) / f"{sample}.json"
    if not re.fullmatch(r"[0-9a-f]{16}", sample) or not record_path.is_file():
        raise AuditError(
            f"{path} line {line}: sample {sample!r} is not an audit sample of {run_dir} (no "
            f"{AUDITS_DIR}/{sample}.json): write the file with `rotserve judge audit {run_dir}`"
        )
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as e:
        raise AuditError(f"{record_path}: not valid JSON ({e}); write the sample again") from None
    ar = AuditRubric(**{k: (tuple(v) if k == "labels" else v) for k, v in record["rubric"].items()})
    want = {it["item"]: it["row_key"] for it in record["items"]}
    labels_by_lower = {lb.lower(): lb for lb in ar.labels}
    problems: list[str] = []
    seen: dict[int, int] = {}
    got: dict[str, tuple[str, str]] = {}  # row_key -> (label, as typed)
    for line, rec in records:
        where = f"line {line}"
        if rec["run_id"].strip() != run_id or rec["sample"].strip() != sample:
            problems.append(
                f"{where}: run_id/sample {rec['run_id'].strip()!r}/{rec['sample'].strip()!r} are "
                f"not this file's ({run_id!r}/{sample!r}): a row pasted from another audit"
            )
            continue
        try:
            item = int(rec["item"].strip())
        except ValueError:
            problems.append(f"{where}: item {rec['item']!r} is not a number")
            continue
        if item not in want:
            problems.append(
                f"{where}: item {item} is not in sample {sample} (items 1-{len(want)}): an "
                "extra row; delete it"
            )
            continue
        if item in seen:
            problems.append(f"{where}: item {item} appears twice (also line {seen[item]})")
            continue
        seen[item] = line
        key = rec["row_key"].strip()
        if key != want[item]:
            problems.append(
                f"{where}: item {item} has row_key {key!r}, but the sample's item {item} is "
                f"{want[item]!r}: a relabelled or moved row; restore its row_key (or the "
                "original file)"
            )
            continue
        typed = rec["label"].strip()
        if not typed:
            problems.append(
                f"{where}: item {item} has no label; give every row one of {', '.join(ar.labels)}"
            )
            continue
        label = labels_by_lower.get(typed.lower())
        if label is None:
            problems.append(
                f"{where}: item {item}: label {typed!r} is not one of rubric {ar.name!r}'s "
                f"labels ({', '.join(ar.labels)})"
            )
            continue
        got[key] = (label, rec["label"])
    absent = sorted(set(want) - set(seen))
    if absent:
        shown = ", ".join(map(str, absent[:MAX_PROBLEMS]))
        problems.append(
            f"item(s) {shown}{' ...' if len(absent) > MAX_PROBLEMS else ''} of sample {sample} "
            "are missing: every sampled row must come back, labelled"
        )
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise AuditError(
            f"audit file {path}: {len(problems)} problem(s), nothing imported:\n  "
            + "\n  ".join(problems[:MAX_PROBLEMS])
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return _write_human_table(run_dir, run_id, path, record, ar, got, name, overwrite, argv)


def _write_human_table(
    run_dir: Path,
    run_id: str,
    path: Path,
    record: dict[str, Any],
    ar: AuditRubric,
    got: dict[str, tuple[str, str]],
    name: str | None,
    overwrite: bool,
    argv: list[str] | None,
) -> AuditImport:
    name = name or f"{HUMAN}.{ar.name}"
    keys = [it["row_key"] for it in record["items"]]
    labels = [got[k][0] for k in keys]
    n = len(keys)
    table = engine_free_table(
        run_id, keys, HUMAN, ar.name, labels, [got[k][1] for k in keys], parsed=True
    )  # raw: the label as typed
    identity = {
        "format": VERDICT_FORMAT,
        "run_id": run_id,
        "judge": HUMAN,
        "rubric": ar.name,
        "rubric_fingerprint": ar.fingerprint,
        "sample": record["sample"],
        "labels": hashlib.sha256("\n".join(labels).encode()).hexdigest()[:16],
    }
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    verdict_id = hashlib.sha256(blob).hexdigest()[:12]
    counts = {lb: labels.count(lb) for lb in ar.labels}
    manifest = {
        "format": VERDICT_FORMAT,
        "run_id": run_id,
        "verdict_id": verdict_id,
        "name": name,
        "status": "complete",
        "created": now(),
        "command": argv,
        "judge": {"model": HUMAN, "model_is_local": True, "revision": None},
        "rubric": ar.as_dict(),
        "rules": {
            "short_response": None,
            "reading": "labels typed by a person in an audit file (case-insensitive), checked "
            "against the sample recorded in audits/<sample>.json",
        },
        "audit": {
            "sample": record["sample"],
            "file": str(path.resolve()),
            "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "seed": record["seed"],
            "by": record["by"],
            "strata": record["strata"],
            "rule": record["rule"],
        },
        "canary": {"status": "not run", "why": "a person, not a model"},
        "counts": {"rows": n, "judged": n, "by_rule": 0, "truncated": 0, "unparsed": 0},
        "labels_counted": counts,
        "identity": identity,
        "rows": {"expected": n, "written": n},
        "schema": [
            {"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in VERDICT_SCHEMA
        ],
        **provenance(),
    }
    try:
        mpath, state = publish_table(run_dir, name, run_id, verdict_id, table, manifest, overwrite)
    except RunDirError as e:
        raise AuditError(
            f"{e} (a table of other labels: import with --overwrite to replace it, or --name)"
        ) from None
    return AuditImport(name, mpath.parent / name, mpath, state, counts)
