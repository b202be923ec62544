"""Adapters from public data layouts to an :class:`InteractionTable`.

Each adapter only builds a :class:`~csmf_tf.data.validation.TableSpec`; reading and row checks are done by
:func:`~csmf_tf.data.validation.read_delimited`, so every adapter reports bad rows the same way
(``on_bad_rows="error"`` raises :class:`~csmf_tf.data.validation.BadRowsError`; ``"skip"`` writes a rejects
file). Derived labels must still satisfy the cascade; rows that break it are bad rows.

- :func:`read_generic`: any CSV/TSV, with a column mapping and label rules.
- :func:`read_beibei`: Beibei view -> cart -> purchase (AI607 release, ``task1_val_answers.tsv``).
- :func:`read_aliexpress`: the processed AliExpress multi-task layout (no user/item id columns).
- :func:`read_ali_ccp`: the Ali-CCP sample layout (ESMM).
- :func:`read_movielens`: MovieLens ``ratings.csv`` + ``movies.csv`` (rated -> rating >= 4 -> rating >= 4.5),
  with genre (multi-hot) and release-year item features. It joins two files, so it checks rows itself
  with the same reasons, report and policies (plus ``unknown_item``, ``duplicate_item``, ``bad_genres``).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from csmf_tf.data.table import CATEGORICAL, DEFAULT_OBJECTIVES, NUMERIC, InteractionTable
from csmf_tf.data.validation import (BAD_LABEL, CASCADE_VIOLATION, DUPLICATE_PAIR, MAX_REPORTED,
                                     MISSING_ITEM_ID, MISSING_USER_ID, POLICIES, BadRow, BadRowsError, LabelRule,
                                     TableSpec, ValidationReport, _Bad, _default_rejects_path, _split,
                                     parse_timestamp, read_delimited, split_row, write_rejects)

logger = logging.getLogger("csmf_tf.data")


def _features(spec: Mapping[str, str | tuple[str, str]] | None, default_kind: str) -> dict[str, tuple[str, str]]:
    """``{name: column}`` or ``{name: (column, kind)}`` -> ``{name: (column, kind)}``."""
    out: dict[str, tuple[str, str]] = {}
    for name, v in (spec or {}).items():
        if isinstance(v, str):
            out[name] = (v, default_kind)
        else:
            col, kind = v
            out[name] = (col, kind)
    return out


def read_generic(path: str | os.PathLike, column_mapping: Mapping[str, str | Sequence[str]],
                 labels: Mapping[str, str | int], delimiter: str | None = None, header: bool = True,
                 column_names: Sequence[str] | None = None,
                 user_features: Mapping[str, str | tuple[str, str]] | None = None,
                 item_features: Mapping[str, str | tuple[str, str]] | None = None,
                 timestamp: str | None = None, duplicates: str = "bad", on_bad_rows: str = "error",
                 rejects_path: str | os.PathLike | None = None) -> InteractionTable:
    """Read any CSV/TSV file into a table.

    Args:
      path: the file; ``delimiter=None`` picks tab for ``.tsv``/``.tab``, comma otherwise.
      column_mapping: ``{"user_id": <column or columns>, "item_id": <column or columns>}``; a list of
        columns is hashed into a stable id (:func:`~csmf_tf.data.validation.hash_id`). It may also
        hold ``"timestamp"``.
      labels: ``{objective: rule}`` in cascade order, e.g. ``{"exposure": "1", "click": "label>=2",
        "conversion": "label>=3"}``; a rule is a constant ``0``/``1``, a 0/1 column name, or
        ``<column><op><number>`` with ``op`` in ``>=, >, ==, <=, <``.
      header / column_names: whether line 1 names the columns; names for header-less files.
      user_features / item_features: ``{name: column}`` (categorical) or ``{name: (column, kind)}``.
      timestamp: timestamp column (epoch seconds or ISO-8601), if any.
      duplicates: ``"bad"`` (repeated pairs are bad rows) or ``"merge"`` (labels OR-ed into the first).
      on_bad_rows / rejects_path: see :func:`~csmf_tf.data.validation.validate_delimited`.
    """
    unknown = set(column_mapping) - {"user_id", "item_id", "timestamp"}
    missing = {"user_id", "item_id"} - set(column_mapping)
    if unknown or missing:
        raise ValueError(f"column_mapping needs keys 'user_id' and 'item_id' (optionally 'timestamp'); "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    ts = timestamp if timestamp is not None else column_mapping.get("timestamp")
    spec = TableSpec(user_id=column_mapping["user_id"], item_id=column_mapping["item_id"],
                     labels={o: LabelRule.parse(r) for o, r in labels.items()}, timestamp=ts,
                     user_features=_features(user_features, CATEGORICAL),
                     item_features=_features(item_features, CATEGORICAL),
                     delimiter=delimiter, header=header, column_names=column_names, duplicates=duplicates)
    return read_delimited(path, spec, on_bad_rows=on_bad_rows, rejects_path=rejects_path)


BEIBEI_COLUMNS = ("user_id", "item_id", "label")


def read_beibei(path: str | os.PathLike, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                on_bad_rows: str = "error", rejects_path: str | os.PathLike | None = None) -> InteractionTable:
    """Beibei (AI607 release) ``task1_val_answers.tsv``: tab-separated, no header, ``user_id item_id label``.

    ``label`` 0 = sampled non-interaction, 1 = viewed, 2 = carted, 3 = purchased (nested). Mapping:
    ``exposure = label >= 1`` (views), ``click = label >= 2`` (cart), ``conversion = label == 3``
    (purchase). **Label-0 rows are kept as all-zero rows**: they are sampled negative pairs, not logged
    impressions, so they are positives of no objective (the stage-1 dataset ignores them) but remain
    available, e.g. as explicit negatives for evaluation. No timestamps, no side features.
    """
    if len(objectives) != 3:
        raise ValueError(f"Beibei has 3 cascade stages (view, cart, purchase); got objectives {objectives}")
    o = tuple(objectives)
    spec = TableSpec(user_id="user_id", item_id="item_id",
                     labels={o[0]: "label>=1", o[1]: "label>=2", o[2]: "label==3"},
                     delimiter="\t", header=False, column_names=BEIBEI_COLUMNS)
    return read_delimited(path, spec, on_bad_rows=on_bad_rows, rejects_path=rejects_path)


ALIEXPRESS_USER_CATEGORICAL = tuple(f"categorical_{k}" for k in range(1, 10))
ALIEXPRESS_ITEM_CATEGORICAL = tuple(f"categorical_{k}" for k in range(10, 17))
ALIEXPRESS_USER_NUMERIC = tuple(f"numerical_{k}" for k in range(1, 24))
ALIEXPRESS_ITEM_NUMERIC = tuple(f"numerical_{k}" for k in range(24, 64))


def read_aliexpress(path: str | os.PathLike, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                    numeric_features: bool = False, on_bad_rows: str = "error",
                    rejects_path: str | os.PathLike | None = None) -> InteractionTable:
    """The processed AliExpress layout: ``search_id, categorical_1..16, numerical_1..63, click, conversion``.

    There are no user or item ids. ``user_id`` = ``search_id`` (each search page is a query);
    ``item_id`` = a stable hash (:func:`~csmf_tf.data.validation.hash_id`) of every item-side column
    (``categorical_10..16`` and ``numerical_24..63``), so identical item descriptions share an id.
    Labels: exposure = 1 on every row (each row is an impression), click, conversion.
    Features: ``categorical_1..9`` (user side) and ``categorical_10..16`` (item side) as categorical; with
    ``numeric_features=True`` also ``numerical_1..23`` (user) and ``numerical_24..63`` (item) as numeric.
    """
    if len(objectives) != 3:
        raise ValueError(f"AliExpress has 3 stages (impression, click, conversion); got {objectives}")
    o = tuple(objectives)
    user_f = {c: (c, CATEGORICAL) for c in ALIEXPRESS_USER_CATEGORICAL}
    item_f = {c: (c, CATEGORICAL) for c in ALIEXPRESS_ITEM_CATEGORICAL}
    if numeric_features:
        user_f.update({c: (c, NUMERIC) for c in ALIEXPRESS_USER_NUMERIC})
        item_f.update({c: (c, NUMERIC) for c in ALIEXPRESS_ITEM_NUMERIC})
    spec = TableSpec(user_id="search_id", item_id=ALIEXPRESS_ITEM_CATEGORICAL + ALIEXPRESS_ITEM_NUMERIC,
                     labels={o[0]: "1", o[1]: "click", o[2]: "conversion"},
                     user_features=user_f, item_features=item_f, delimiter=",", header=True)
    return read_delimited(path, spec, on_bad_rows=on_bad_rows, rejects_path=rejects_path)


ALI_CCP_USER_FIELDS = ("121", "122", "124", "125", "126", "127", "128", "129")
ALI_CCP_ITEM_FIELDS = {"206": "category", "207": "shop", "216": "brand"}


def read_ali_ccp(path: str | os.PathLike, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                 duplicates: str = "merge", on_bad_rows: str = "error",
                 rejects_path: str | os.PathLike | None = None) -> InteractionTable:
    """The Ali-CCP sample layout: ``click, purchase, 101, 121, ..., 205, 206, 207, ..., D853``.

    ``user_id`` = field ``101``, ``item_id`` = field ``205``; exposure = 1 on every row (impressions),
    click = ``click``, conversion = ``purchase``. Categorical features: user fields ``121..129`` (named
    ``user_<field>``) and item fields ``206`` (``item_category``), ``207`` (``item_shop``), ``216``
    (``item_brand``). The same user sees the same item several times (repeated impressions), so
    ``duplicates="merge"`` (default) ORs the labels of a repeated pair into its first row (counted and
    logged); ``duplicates="bad"`` treats repeats as bad rows.
    """
    if len(objectives) != 3:
        raise ValueError(f"Ali-CCP has 3 stages (impression, click, purchase); got {objectives}")
    o = tuple(objectives)
    spec = TableSpec(user_id="101", item_id="205", labels={o[0]: "1", o[1]: "click", o[2]: "purchase"},
                     user_features={f"user_{c}": (c, CATEGORICAL) for c in ALI_CCP_USER_FIELDS},
                     item_features={f"item_{n}": (c, CATEGORICAL) for c, n in ALI_CCP_ITEM_FIELDS.items()},
                     delimiter=",", header=True, duplicates=duplicates)
    return read_delimited(path, spec, on_bad_rows=on_bad_rows, rejects_path=rejects_path)


MOVIELENS_RATINGS_COLUMNS = ("userId", "movieId", "rating", "timestamp")
MOVIELENS_MOVIES_COLUMNS = ("movieId", "title", "genres")
MOVIELENS_NO_GENRES = "(no genres listed)"
MOVIELENS_CLICK_RULE = "rating>=4"
MOVIELENS_CONVERSION_RULE = "rating>=4.5"
# Bad-row reasons that only a join of two files can have (the other reasons are validation.REASONS).
UNKNOWN_ITEM = "unknown_item"        # ratings.csv: a movieId that movies.csv does not list (or rejected)
DUPLICATE_ITEM = "duplicate_item"    # movies.csv: a movieId already listed on an earlier line
BAD_GENRES = "bad_genres"            # movies.csv: an empty genres field or an empty / unnameable genre
_YEAR_RE = re.compile(r"\((\d{4})\)$")


def movielens_genre_feature(genre: str) -> str:
    """Feature name of a genre: ``"Sci-Fi"`` -> ``"genre_sci_fi"``, ``"Film-Noir"`` -> ``"genre_film_noir"``.

    Lower case, every run of characters other than ``[a-z0-9]`` becomes one ``_`` (trimmed at both ends),
    so the name is a Python identifier and a valid Keras/TF name (tower inputs become serving-signature
    arguments, which must be identifiers). Returns ``""`` when nothing is left (the genre is then a bad row).
    """
    slug = re.sub(r"[^0-9a-z]+", "_", genre.strip().lower()).strip("_")
    return f"genre_{slug}" if slug else ""


def movielens_year(title: str) -> int | None:
    """Release year from a title: ``"Toy Story (1995)"`` -> 1995; ``None`` when the title has none.

    The title is stripped first (some titles end in spaces); the year is a 4-digit group in parentheses at
    the very end. Anything else is "no year": ``"Babylon 5"``, and ranges such as ``"(2006–2007)"``.
    """
    m = _YEAR_RE.search(title.strip())
    return int(m.group(1)) if m else None


def _check_csv(path: Path, header: Sequence[str], parse, report: ValidationReport, bad: list[BadRow]) -> None:
    """Read ``path`` (UTF-8, comma, CRLF or LF, one header line equal to ``header``) row by row.

    ``parse(fields, line_no)`` handles a row of the right width or raises ``_Bad``; bad rows are counted
    in ``report`` and appended to ``bad`` exactly as :func:`~csmf_tf.data.validation.validate_delimited`
    does (same reasons for malformed rows, same 1-based physical line numbers).
    """
    fname = str(path)
    with open(path, "rb") as fh:
        first = fh.readline()
        if not first:
            raise ValueError(f"{fname}: empty file, expected a header line")
        try:
            names = [c.strip() for c in _split(first.decode("utf-8-sig").rstrip("\r\n"), ",")]
        except (UnicodeDecodeError, _Bad) as e:
            raise ValueError(f"{fname}: unreadable header line ({e})") from None
        if names != list(header):
            raise ValueError(f"{fname}: header {names} differs from expected columns {list(header)}")
        for line_no, raw_bytes in enumerate(fh, start=2):
            report.rows_read += 1
            raw = raw_bytes.decode("utf-8", "replace").rstrip("\r\n")
            try:
                parse(split_row(raw_bytes, ",", len(header)), line_no)
            except _Bad as b:
                report.bad_counts[b.reason] = report.bad_counts.get(b.reason, 0) + 1
                bad.append(BadRow(fname, line_no, b.reason, b.detail, raw))
                continue
            report.rows_kept += 1
    report.examples = bad[:MAX_REPORTED]


def read_movielens(folder: str | os.PathLike, objectives: Sequence[str] = DEFAULT_OBJECTIVES,
                   on_bad_rows: str = "error", rejects_path: str | os.PathLike | None = None) -> InteractionTable:
    """MovieLens (``ml-latest-small`` layout): ``ratings.csv`` + ``movies.csv`` of ``folder``.

    Rows: one per line of ``ratings.csv`` (``userId,movieId,rating,timestamp``); ``user_id`` = ``userId``,
    ``item_id`` = ``movieId``, ``timestamp`` = ``timestamp`` (epoch seconds), so the time split applies.
    Labels, in cascade order: ``exposure = 1`` (the user rated the movie), ``click = rating >= 4.0``,
    ``conversion = rating >= 4.5``. The cascade holds by construction (``4.5 >= 4.0``; checked per row
    anyway). A rating is not an impression: there are no shown-but-unrated negatives, and "click rate"
    is the share of ratings >= 4, not a CTR.

    Item features (all ``"numeric"``, because towers take single-valued categorical or numeric inputs
    only), from ``movies.csv`` (``movieId,title,genres``):

    - ``genre_<name>``: multi-hot, one 0/1 column per genre found anywhere in ``movies.csv`` (``genres``
      is ``A|B|...``); names from :func:`movielens_genre_feature` (``Sci-Fi`` -> ``genre_sci_fi``).
      ``(no genres listed)`` means no genre: every ``genre_*`` column is 0.
    - ``year``: release year from the end of the title (:func:`movielens_year`: stripped title, then
      ``(YYYY)``). A title without a year gets the **mean year of the titles that have one** (so the
      tower's normalisation maps it to about 0) and ``year_missing = 1``.
    - ``year_missing``: 1 when the title has no year, else 0. Always present (a constant 0 column when
      every title has a year), so the schema depends only on the genres.

    Bad rows (same reasons, report, policies and rejects format as
    :func:`~csmf_tf.data.validation.validate_delimited`; quoted titles with commas are fine, CRLF and LF
    both read). ``movies.csv``: ``malformed_row``, ``missing_item_id``, ``duplicate_item`` (a movieId
    already listed; the first is kept), ``bad_genres`` (empty field or genre). ``ratings.csv``, first
    reason that applies: ``malformed_row``, ``missing_user_id``, ``missing_item_id``, ``bad_label``
    (rating not a number, or off the 0.5..5.0 half-star scale), ``bad_timestamp``, ``unknown_item``
    (movieId not in ``movies.csv``, or its ``movies.csv`` row was rejected), ``cascade_violation``,
    ``duplicate_pair``. With ``on_bad_rows="error"`` a bad ``movies.csv`` raises
    :class:`~csmf_tf.data.validation.BadRowsError` before ratings are read (their unknown-movie errors
    would only echo it); with ``"skip"`` the rows of both files go to one rejects CSV (its ``file``
    column tells them apart; default: a file under the temp dir named after ``ratings.csv``).
    """
    if len(objectives) != 3:
        raise ValueError(f"MovieLens has 3 cascade stages (rated, >=4, >=4.5); got objectives {objectives}")
    if on_bad_rows not in POLICIES:
        raise ValueError(f"on_bad_rows must be one of {POLICIES}; got {on_bad_rows!r}")
    folder = Path(folder)
    ratings_path, movies_path = folder / "ratings.csv", folder / "movies.csv"
    for p in (ratings_path, movies_path):
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p} (read_movielens needs ratings.csv and movies.csv)")

    # --- movies.csv: movieId -> (line, genres, year)
    movies: dict[str, tuple[int, tuple[str, ...], int | None]] = {}
    rejected_movies: dict[str, int] = {}

    def parse_movie(f: list[str], line_no: int) -> None:
        mid = f[0].strip()
        if not mid:
            raise _Bad(MISSING_ITEM_ID, "empty movieId")
        if mid in movies:
            raise _Bad(DUPLICATE_ITEM, f"movieId {mid!r} already on line {movies[mid][0]}")
        text = f[2].strip()
        genres: tuple[str, ...] = ()
        if text != MOVIELENS_NO_GENRES:
            genres = tuple(g.strip() for g in text.split("|"))
            if not text or not all(movielens_genre_feature(g) for g in genres):
                rejected_movies.setdefault(mid, line_no)
                raise _Bad(BAD_GENRES, f"genres {f[2]!r}: expected 'A|B|...' (non-empty names) "
                                       f"or {MOVIELENS_NO_GENRES!r}")
        movies[mid] = (line_no, genres, movielens_year(f[1]))

    movie_report, movie_bad = ValidationReport(path=str(movies_path)), []
    _check_csv(movies_path, MOVIELENS_MOVIES_COLUMNS, parse_movie, movie_report, movie_bad)
    if movie_bad and on_bad_rows == "error":
        raise BadRowsError(movie_report)

    genre_names: dict[str, str] = {}  # feature name -> first genre text mapped to it
    for _, genres, _ in movies.values():
        for g in genres:
            name = movielens_genre_feature(g)
            if genre_names.setdefault(name, g) != g:
                raise ValueError(f"{movies_path}: genres {genre_names[name]!r} and {g!r} both map to feature "
                                 f"{name!r}; rename one")
    genre_columns = sorted(genre_names)
    movie_ids = list(movies)
    movie_row = {m: k for k, m in enumerate(movie_ids)}
    multi_hot = np.zeros((len(movie_ids), len(genre_columns)), np.float32)
    column_of = {n: j for j, n in enumerate(genre_columns)}
    for k, m in enumerate(movie_ids):
        for g in movies[m][1]:
            multi_hot[k, column_of[movielens_genre_feature(g)]] = 1.0
    years = np.array([np.nan if movies[m][2] is None else movies[m][2] for m in movie_ids], np.float64)
    missing = np.isnan(years)
    fill = float(years[~missing].mean()) if (~missing).any() else 0.0
    year_column = np.where(missing, fill, years).astype(np.float32)

    # --- ratings.csv
    o = tuple(objectives)
    rules = [LabelRule.parse("1"), LabelRule.parse(MOVIELENS_CLICK_RULE), LabelRule.parse(MOVIELENS_CONVERSION_RULE)]
    users: list[str] = []
    rows: list[int] = []
    labels: list[list[int]] = []
    stamps: list[int] = []
    seen: dict[tuple[str, str], int] = {}

    def parse_rating(f: list[str], line_no: int) -> None:
        uid, mid, rating = f[0].strip(), f[1].strip(), f[2].strip()
        if not uid:
            raise _Bad(MISSING_USER_ID, "empty userId")
        if not mid:
            raise _Bad(MISSING_ITEM_ID, "empty movieId")
        try:
            x = float(rating)
        except ValueError:
            raise _Bad(BAD_LABEL, f"rating {f[2]!r} is not a number") from None
        if not (np.isfinite(x) and (2 * x).is_integer() and 1 <= 2 * x <= 10):
            raise _Bad(BAD_LABEL, f"rating {f[2]!r} is not on the 0.5..5.0 half-star scale")
        lab = [r.apply(rating) for r in rules]
        ts = parse_timestamp(f[3])
        if mid not in movie_row:
            why = (f"its {movies_path.name} row (line {rejected_movies[mid]}) was rejected" if mid in rejected_movies
                   else f"not listed in {movies_path.name}")
            raise _Bad(UNKNOWN_ITEM, f"movieId {mid!r}: {why}")
        for t in range(1, len(lab)):
            if lab[t] > lab[t - 1]:
                raise _Bad(CASCADE_VIOLATION, f"{o[t]}=1 but {o[t - 1]}=0 (rules {rules[t]} / {rules[t - 1]})")
        key = (uid, mid)
        if key in seen:
            raise _Bad(DUPLICATE_PAIR, f"pair (user {uid!r}, movie {mid!r}) already on line {seen[key]}")
        seen[key] = line_no
        users.append(uid)
        rows.append(movie_row[mid])
        labels.append(lab)
        stamps.append(ts)

    rating_report, rating_bad = ValidationReport(path=str(ratings_path)), []
    _check_csv(ratings_path, MOVIELENS_RATINGS_COLUMNS, parse_rating, rating_report, rating_bad)
    if rating_bad and on_bad_rows == "error":
        raise BadRowsError(rating_report)
    if on_bad_rows == "skip":
        rp = write_rejects(movie_bad + rating_bad, rejects_path or _default_rejects_path(ratings_path))
        for report in (movie_report, rating_report):
            report.rejects_path = str(rp)
            if report.num_bad:
                logger.warning("skipped %s; rejected rows written to %s", report.summary(), rp)
            else:
                logger.info("%s (no rejects; rejects file %s)", report.summary(), rp)
    logger.info("MovieLens %s: %d movies, %d genres, %d titles without a year (year := %.1f, year_missing = 1)",
                folder, len(movie_ids), len(genre_columns), int(missing.sum()), fill)

    idx = np.array(rows, dtype=np.int64)
    item_features = {"year": year_column[idx], "year_missing": missing.astype(np.float32)[idx]}
    item_features.update({n: multi_hot[idx, j] for j, n in enumerate(genre_columns)})
    return InteractionTable(
        user_id=np.array(users, dtype=object), item_id=np.array(movie_ids, dtype=object)[idx],
        labels=np.array(labels, dtype=np.int8).reshape(len(users), 3), objectives=o,
        timestamp=np.array(stamps, dtype=np.int64), item_features=item_features,
        feature_kinds={n: NUMERIC for n in item_features})
