"""Reading delimited files (CSV/TSV) into an :class:`InteractionTable`, checking every row.

Every adapter goes through :func:`read_delimited` with a :class:`TableSpec` saying which column is what.
A row is *bad*, with one of these reasons (the first that applies, checked in this order):

==================== =====================================================================================
``malformed_row``    wrong number of columns, broken quoting, a blank line, or bytes that are not UTF-8
``missing_user_id``  the user id is empty
``missing_item_id``  the item id is empty
``bad_label``        a label column that is not 0/1, or a compared column that is not a number
``bad_timestamp``    a timestamp that is neither a number (epoch seconds) nor an ISO-8601 date-time
``bad_numeric``      a numeric feature that is empty, does not parse as a number, or is not finite
``cascade_violation`` derived labels that break the cascade (``y_t = 1`` while ``y_{t-1} = 0``)
``duplicate_pair``   a (user, item) pair already seen on an earlier line (the earlier row is kept)
==================== =====================================================================================

Repeated (user, item) pairs are bad rows by default; with ``TableSpec.duplicates="merge"`` (repeated
impressions, as in Ali-CCP) they are merged into the first row instead: labels are OR-ed (which keeps
the cascade), the earliest timestamp and the first row's features are kept, and the count is reported
(``ValidationReport.merged_duplicates``) and logged.

Policies (``on_bad_rows``): ``"error"`` (default) raises :class:`BadRowsError` naming file, line number and
reason of the first bad rows plus counts per reason; ``"skip"`` drops them, logs the counts per reason and
writes every dropped row to a rejects CSV (columns ``file,line,reason,raw,detail``). Nothing is dropped
silently. Quoted fields may not span lines (each physical line is one row).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import hashlib
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from csmf_tf.data.table import CATEGORICAL, NUMERIC, InteractionTable

logger = logging.getLogger("csmf_tf.data")

MALFORMED = "malformed_row"
MISSING_USER_ID = "missing_user_id"
MISSING_ITEM_ID = "missing_item_id"
BAD_LABEL = "bad_label"
BAD_TIMESTAMP = "bad_timestamp"
BAD_NUMERIC = "bad_numeric"
CASCADE_VIOLATION = "cascade_violation"
DUPLICATE_PAIR = "duplicate_pair"
REASONS: tuple[str, ...] = (MALFORMED, MISSING_USER_ID, MISSING_ITEM_ID, BAD_LABEL, BAD_TIMESTAMP,
                            BAD_NUMERIC, CASCADE_VIOLATION, DUPLICATE_PAIR)
MAX_REPORTED = 10
POLICIES = ("error", "skip")


class _Bad(Exception):
    """Internal: raised while parsing one row; carries the reason code and a human detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class BadRow:
    """One rejected row: ``file``, 1-based physical ``line``, ``reason`` code, ``detail`` and ``raw`` text."""

    file: str
    line: int
    reason: str
    detail: str
    raw: str

    def describe(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.detail}"


@dataclasses.dataclass
class ValidationReport:
    """What a read found: rows read / kept, bad-row counts per reason, the first bad rows, rejects file."""

    path: str
    rows_read: int = 0
    rows_kept: int = 0
    bad_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[BadRow] = dataclasses.field(default_factory=list)
    rejects_path: str | None = None
    merged_duplicates: int = 0

    @property
    def num_bad(self) -> int:
        return sum(self.bad_counts.values())

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_counts.items())) or "none"
        merged = f", {self.merged_duplicates} duplicate pairs merged" if self.merged_duplicates else ""
        return (f"{self.path}: {self.rows_read} rows read, {self.rows_kept} kept, {self.num_bad} bad "
                f"({counts}){merged}")


class BadRowsError(ValueError):
    """Raised by ``on_bad_rows="error"``; ``.report`` holds the full :class:`ValidationReport`."""

    def __init__(self, report: ValidationReport):
        lines = [f"{report.num_bad} bad row(s) in {report.path} "
                 f"(counts per reason: {dict(sorted(report.bad_counts.items()))}); first ones:"]
        lines += ["  " + b.describe() for b in report.examples]
        lines.append("Fix the file, or pass on_bad_rows='skip' to drop them into a rejects file.")
        super().__init__("\n".join(lines))
        self.report = report


# ------------------------------------------------------------------------------------------------ rules

_RULE_RE = re.compile(r"^\s*(?P<col>[^<>=]+?)\s*(?P<op>>=|<=|==|>|<)\s*"
                      r"(?P<num>[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")
_OPS = {">=": float.__ge__, ">": float.__gt__, "==": float.__eq__, "<=": float.__le__, "<": float.__lt__}


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """How one 0/1 label is derived from a row.

    Text forms (:meth:`parse`): ``"1"`` / ``"0"`` (constant), ``"<column>"`` (the column must hold 0 or 1),
    ``"<column><op><number>"`` with ``op`` in ``>=, >, ==, <=, <`` (the column must hold a number; the
    label is the comparison). Constants win over a column literally named ``"0"`` or ``"1"``.
    """

    column: str | None
    op: str | None = None
    value: float | None = None
    constant: int | None = None

    @staticmethod
    def parse(text: str | int) -> "LabelRule":
        if isinstance(text, (int, np.integer)) or str(text).strip() in ("0", "1"):
            c = int(str(text).strip())
            if c not in (0, 1):
                raise ValueError(f"label constant must be 0 or 1; got {text!r}")
            return LabelRule(column=None, constant=c)
        text = str(text)
        m = _RULE_RE.match(text)
        if m:
            return LabelRule(column=m["col"], op=m["op"], value=float(m["num"]))
        if not text.strip() or any(o in text for o in ("<", ">", "==")):
            raise ValueError(f"cannot parse label rule {text!r}: use a constant 0/1, a column name, or "
                             "'<column><op><number>' with op one of >=, >, ==, <=, <")
        return LabelRule(column=text.strip())

    def __str__(self) -> str:
        if self.constant is not None:
            return str(self.constant)
        if self.op is None:
            return str(self.column)
        return f"{self.column}{self.op}{self.value:g}"

    def apply(self, raw: str) -> int:
        """The label for the column's raw text (ignored for constants); raises ``_Bad(bad_label)``."""
        if self.constant is not None:
            return self.constant
        text = raw.strip()
        try:
            x = float(text)
        except ValueError:
            raise _Bad(BAD_LABEL, f"column {self.column!r} = {raw!r} is not a number (rule {self})") from None
        if self.op is None:
            if x not in (0.0, 1.0):
                raise _Bad(BAD_LABEL, f"column {self.column!r} = {raw!r} is not 0/1")
            return int(x)
        if math.isnan(x):
            raise _Bad(BAD_LABEL, f"column {self.column!r} = {raw!r} is NaN (rule {self})")
        return int(_OPS[self.op](x, self.value))


# ------------------------------------------------------------------------------------------------- spec


@dataclasses.dataclass
class TableSpec:
    """Which columns of a delimited file make up the table.

    Attributes:
      user_id / item_id: a column name, or a sequence of column names whose values are hashed into a
        stable id (:func:`hash_id`) when the file has no id column.
      labels: ``{objective: rule}`` in cascade order; a rule is a :class:`LabelRule` or its text form.
      timestamp: column with epoch seconds (int/float) or ISO-8601 date-times (naive = UTC); optional.
      user_features / item_features: ``{feature name: (column, kind)}``, kind ``"categorical"``/``"numeric"``.
      delimiter: ``None`` picks ``"\\t"`` for ``.tsv``/``.tab`` files and ``","`` otherwise.
      header: whether the first line holds column names.
      column_names: the names of the columns of a header-less file (required when ``header=False``).
      duplicates: ``"bad"`` (a repeated (user, item) pair is a bad row) or ``"merge"`` (OR the labels
        into the first row; see the module docstring).
    """

    user_id: str | Sequence[str]
    item_id: str | Sequence[str]
    labels: Mapping[str, LabelRule | str | int]
    timestamp: str | None = None
    user_features: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    item_features: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    delimiter: str | None = None
    header: bool = True
    column_names: Sequence[str] | None = None
    duplicates: str = "bad"

    def rules(self) -> dict[str, LabelRule]:
        return {o: r if isinstance(r, LabelRule) else LabelRule.parse(r) for o, r in self.labels.items()}

    def referenced_columns(self) -> list[str]:
        cols: list[str] = []
        for ref in (self.user_id, self.item_id):
            cols += [ref] if isinstance(ref, str) else list(ref)
        cols += [r.column for r in self.rules().values() if r.column is not None]
        if self.timestamp:
            cols.append(self.timestamp)
        cols += [c for c, _ in [*self.user_features.values(), *self.item_features.values()]]
        return cols


def delimiter_for(path: str | os.PathLike) -> str:
    """``"\\t"`` for ``.tsv``/``.tab`` files, ``","`` otherwise."""
    return "\t" if Path(path).suffix.lower() in (".tsv", ".tab") else ","


def _canonical(value: str) -> str:
    """Number-like text in one canonical form (so ``1``, ``1.0`` and `` 1 `` hash alike)."""
    v = value.strip()
    try:
        f = float(v)
    except ValueError:
        return v
    return repr(f) if math.isfinite(f) else v


def hash_id(values: Sequence[str], digest_size: int = 8) -> str:
    """Stable id for a tuple of raw values: hex blake2b of their canonical forms joined by ``\\x1f``."""
    joined = "\x1f".join(_canonical(v) for v in values)
    return hashlib.blake2b(joined.encode(), digest_size=digest_size).hexdigest()


def parse_timestamp(text: str) -> int:
    """Epoch seconds from ``"1700000000"``, ``"1700000000.5"`` (floored) or ISO-8601 (naive = UTC)."""
    t = text.strip()
    try:
        f = float(t)
        if not math.isfinite(f):
            raise ValueError(t)
        return int(math.floor(f))
    except ValueError:
        pass
    try:
        d = _dt.datetime.fromisoformat(t)
    except ValueError:
        raise _Bad(BAD_TIMESTAMP, f"timestamp {text!r} is neither epoch seconds nor ISO-8601") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return int(math.floor(d.timestamp()))


def _split(line: str, delimiter: str) -> list[str]:
    # Fast path for lines without quotes; csv handles quoted fields (strict: broken quoting -> error).
    if '"' not in line:
        return line.split(delimiter)
    try:
        rows = list(csv.reader([line], delimiter=delimiter, strict=True))
    except csv.Error as e:
        raise _Bad(MALFORMED, f"unparsable quoting ({e})") from None
    if len(rows) != 1:
        raise _Bad(MALFORMED, "unparsable quoting")
    return rows[0]


def split_row(raw_bytes: bytes, delimiter: str, num_columns: int) -> list[str]:
    """The fields of one data line; :class:`_Bad` (``MALFORMED``) for invalid UTF-8, a blank line or the
    wrong number of columns. (The caller keeps ``raw_bytes`` decoded with replacement for the report.)"""
    try:
        raw = raw_bytes.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise _Bad(MALFORMED, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not raw.strip():
        raise _Bad(MALFORMED, "blank line")
    fields = _split(raw, delimiter)
    if len(fields) != num_columns:
        raise _Bad(MALFORMED, f"{len(fields)} columns, expected {num_columns}")
    return fields


def write_rejects(bad_rows: Sequence[BadRow], path: str | os.PathLike) -> Path:
    """The rejects CSV (``file, line, reason, raw, detail``) of skipped rows; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as out:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["file", "line", "reason", "raw", "detail"])
        w.writerows([b.file, b.line, b.reason, b.raw, b.detail] for b in bad_rows)
    return path


def _default_rejects_path(path: Path) -> Path:
    # Source folders may be shared or read-only: rejects go to the temp dir unless a path is given.
    tag = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    return Path(tempfile.gettempdir()) / "csmf_tf_rejects" / f"{path.name}.{tag}.rejects.csv"


def validate_delimited(path: str | os.PathLike, spec: TableSpec, on_bad_rows: str = "error",
                       rejects_path: str | os.PathLike | None = None) -> tuple[InteractionTable, ValidationReport]:
    """Read and check ``path`` according to ``spec``; return the table and the :class:`ValidationReport`.

    See the module docstring for the bad-row reasons and the policies. File-level problems (missing file,
    header without a referenced column, unknown feature kind, bad policy) raise ``ValueError`` /
    ``FileNotFoundError`` at once.
    """
    if on_bad_rows not in POLICIES:
        raise ValueError(f"on_bad_rows must be one of {POLICIES}; got {on_bad_rows!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rules = spec.rules()
    if not rules:
        raise ValueError("spec.labels is empty: at least one objective is needed")
    for name, (col, kind) in [*spec.user_features.items(), *spec.item_features.items()]:
        if kind not in (CATEGORICAL, NUMERIC):
            raise ValueError(f"feature {name!r} (column {col!r}): kind must be {CATEGORICAL!r} or "
                             f"{NUMERIC!r}; got {kind!r}")
    if spec.duplicates not in ("bad", "merge"):
        raise ValueError(f"spec.duplicates must be 'bad' or 'merge'; got {spec.duplicates!r}")
    merge = spec.duplicates == "merge"
    feature_names = [*spec.user_features, *spec.item_features]
    clash = sorted({n for n in feature_names if feature_names.count(n) > 1 or n in ("user_id", "item_id")})
    if clash:
        raise ValueError(f"feature name(s) {clash} used twice or clash with user_id/item_id")
    delimiter = spec.delimiter or delimiter_for(path)
    fname = str(path)
    report = ValidationReport(path=fname)
    bad_rows: list[BadRow] = []

    with open(path, "rb") as fh:
        lines = iter(fh)
        line_no = 0
        if spec.header:
            first = next(lines, None)
            line_no = 1
            if first is None:
                raise ValueError(f"{fname}: empty file, expected a header line")
            names = [c.strip() for c in _split(first.decode("utf-8-sig").rstrip("\r\n"), delimiter)]
        else:
            if not spec.column_names:
                raise ValueError(f"{fname}: spec.header=False needs spec.column_names")
            names = list(spec.column_names)
        if spec.column_names and spec.header and list(spec.column_names) != names:
            raise ValueError(f"{fname}: header {names} differs from expected columns {list(spec.column_names)}")
        missing = [c for c in spec.referenced_columns() if c not in names]
        if missing:
            raise ValueError(f"{fname}: column(s) {sorted(set(missing))} not found; the file has {names}")
        idx = {c: i for i, c in enumerate(names)}
        ncol = len(names)
        u_cols = [idx[spec.user_id]] if isinstance(spec.user_id, str) else [idx[c] for c in spec.user_id]
        i_cols = [idx[spec.item_id]] if isinstance(spec.item_id, str) else [idx[c] for c in spec.item_id]
        u_hash, i_hash = not isinstance(spec.user_id, str), not isinstance(spec.item_id, str)
        rule_items = [(o, r, idx[r.column] if r.column is not None else -1) for o, r in rules.items()]
        objectives = tuple(rules)
        ts_col = idx[spec.timestamp] if spec.timestamp else -1
        feats = [(name, idx[col], kind, "user") for name, (col, kind) in spec.user_features.items()] + \
                [(name, idx[col], kind, "item") for name, (col, kind) in spec.item_features.items()]

        users: list[str] = []
        items: list[str] = []
        labels: list[list[int]] = []
        stamps: list[int] = []
        fvals: dict[str, list] = {name: [] for name, *_ in feats}
        seen: dict[tuple[str, str], tuple[int, int]] = {}  # pair -> (line, kept-row index)

        for raw_bytes in lines:
            line_no += 1
            report.rows_read += 1
            raw = raw_bytes.decode("utf-8", "replace").rstrip("\r\n")
            try:
                f = split_row(raw_bytes, delimiter, ncol)
                uid = hash_id([f[c] for c in u_cols]) if u_hash else f[u_cols[0]].strip()
                if not uid or (u_hash and not any(f[c].strip() for c in u_cols)):
                    raise _Bad(MISSING_USER_ID, "empty user id")
                iid = hash_id([f[c] for c in i_cols]) if i_hash else f[i_cols[0]].strip()
                if not iid or (i_hash and not any(f[c].strip() for c in i_cols)):
                    raise _Bad(MISSING_ITEM_ID, "empty item id")
                lab = [r.apply(f[c] if c >= 0 else "") for _, r, c in rule_items]
                ts = parse_timestamp(f[ts_col]) if ts_col >= 0 else 0
                vals = []
                for name, c, kind, _ in feats:
                    if kind == NUMERIC:
                        try:
                            x = float(f[c])
                        except ValueError:
                            raise _Bad(BAD_NUMERIC, f"numeric feature {name!r} = {f[c]!r} does not parse") from None
                        if not math.isfinite(x):
                            raise _Bad(BAD_NUMERIC, f"numeric feature {name!r} = {f[c]!r} is not finite")
                        vals.append(x)
                    else:
                        vals.append(f[c].strip())
                for t in range(1, len(lab)):
                    if lab[t] > lab[t - 1]:
                        raise _Bad(CASCADE_VIOLATION, f"{objectives[t]}=1 but {objectives[t - 1]}=0 "
                                                      f"(rules {rule_items[t][1]} / {rule_items[t - 1][1]})")
                key = (uid, iid)
                if key in seen:
                    if not merge:
                        raise _Bad(DUPLICATE_PAIR, f"pair (user {uid!r}, item {iid!r}) already on line "
                                                   f"{seen[key][0]}")
                    k = seen[key][1]
                    labels[k] = [max(a, b) for a, b in zip(labels[k], lab)]
                    stamps[k] = min(stamps[k], ts)
                    report.merged_duplicates += 1
                    continue
                seen[key] = (line_no, len(users))
            except _Bad as bad:
                report.bad_counts[bad.reason] = report.bad_counts.get(bad.reason, 0) + 1
                bad_rows.append(BadRow(fname, line_no, bad.reason, bad.detail, raw))
                continue
            users.append(uid)
            items.append(iid)
            labels.append(lab)
            stamps.append(ts)
            for (name, *_), v in zip(feats, vals):
                fvals[name].append(v)

    report.rows_kept = len(users)
    report.examples = bad_rows[:MAX_REPORTED]
    if bad_rows and on_bad_rows == "error":
        raise BadRowsError(report)
    if report.merged_duplicates:
        logger.warning("%s: merged %d repeated (user, item) rows into their first occurrence (labels OR-ed)",
                       fname, report.merged_duplicates)
    if on_bad_rows == "skip":
        report.rejects_path = str(write_rejects(bad_rows, rejects_path or _default_rejects_path(path)))
        if bad_rows:
            logger.warning("skipped %s; rejected rows written to %s", report.summary(), report.rejects_path)
        else:
            logger.info("%s (rejects file %s is empty)", report.summary(), report.rejects_path)

    def column(name: str, kind: str) -> np.ndarray:
        return (np.array(fvals[name], dtype=np.float32) if kind == NUMERIC
                else np.array(fvals[name], dtype=object))

    table = InteractionTable(
        user_id=np.array(users, dtype=object), item_id=np.array(items, dtype=object),
        labels=np.array(labels, dtype=np.int8).reshape(len(users), len(objectives)),
        objectives=objectives,
        timestamp=np.array(stamps, dtype=np.int64) if spec.timestamp else None,
        user_features={n: column(n, k) for n, (_, k) in spec.user_features.items()},
        item_features={n: column(n, k) for n, (_, k) in spec.item_features.items()},
        feature_kinds={n: k for n, (_, k) in [*spec.user_features.items(), *spec.item_features.items()]})
    return table, report


def read_delimited(path: str | os.PathLike, spec: TableSpec, on_bad_rows: str = "error",
                   rejects_path: str | os.PathLike | None = None) -> InteractionTable:
    """:func:`validate_delimited` without the report (it is logged in ``"skip"`` mode)."""
    return validate_delimited(path, spec, on_bad_rows=on_bad_rows, rejects_path=rejects_path)[0]
